#!/usr/bin/env bash
# Runs the main job: `manifoldlens demo` on the embedded digits data, after its own set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/manifoldlens demo "$@"
