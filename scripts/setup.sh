#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with manifoldlens installed
# (editable) and the test tools, torch pinned through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.manifoldlens-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,mnist]"
  touch "$stamp"
fi
