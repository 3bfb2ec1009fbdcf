#!/usr/bin/env bash
# Every benchmark in bench/ on a GPU, sized to end within 10 minutes together (the time
# limits below add up to 600 s).
#
#   bench/run_all_gpu.sh [RESULTS_DIR] [DEVICE]     (defaults: $OUT or bench-gpu, cuda)
#
# Each script runs with --device DEVICE under its own time limit and writes
# RESULTS_DIR/<name>.json (stdout) and <name>.log (stderr); a script that fails or runs out of
# time is reported and the others still run. The GPU paths are the CPU code paths: nothing
# here is GPU-specific but the device. Run from the repository root with the project's
# environment (PYTHON=.venv/bin/python by default).
set -u
cd "$(dirname "$0")/.."
results="${1:-${OUT:-bench-gpu}}"
device="${2:-cuda}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python
mkdir -p "$results"
ckpt_dir="$results/gram-model"
start=$(date +%s)
status=0

run() {  # run NAME SECONDS ARGS...: one benchmark under a time limit
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$limit" "$python" "$@" --device "$device" \
    >"$results/$name.json" 2>"$results/$name.log"
  local rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)"
  [ $rc -eq 0 ] || status=1
}

echo "device $device, results in $results, $("$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')"

# a seed-001 CNN for the Gram benchmark: a short training on Fashion-MNIST (random init when
# the data are missing: the timings do not depend on the weights)
if [ ! -f "$ckpt_dir/model.json" ]; then
  timeout 60 "$python" -m manifoldlens leaf train --steps 300 --trace-every 300 \
    --device "$device" --no-progress --out "$ckpt_dir" >"$results/gram-model.log" 2>&1 ||
  "$python" - "$ckpt_dir" <<'EOF' >>"$results/gram-model.log" 2>&1
import sys, torch
from manifoldlens.models import create_model, save_checkpoint
torch.manual_seed(0)
save_checkpoint(sys.argv[1] + "/model", create_model("seed001_cnn", (1, 28, 28), 10))
EOF
fi

run jacobian 90 bench/jacobian.py --quick --threads 4
run tangent 45 bench/tangent.py --quick --threads 4
run paths 45 bench/paths.py --pairs 64 --steps 5 --ref-pairs 2 --repeats 2 --threads 4
run costs 75 bench/costs.py --repeats 1 --flow-steps 300 --path-steps 200 --threads 4
if "$python" -c 'import normflows' 2>/dev/null; then
  run flows 75 bench/flows.py --quick --threads 4
else
  echo "flows: skipped (normflows is not installed: pip install -c constraints.txt -e '.[bench]')"
fi
run memory 45 bench/memory.py --quick
# ResNet-18 at 3 x 224 x 224, C = 1000, batch 8 (the defaults): the exact G (999 backward
# passes) against top_k = 10, 50 and trace_estimate (issue 12)
run topk 45 bench/topk.py --threads 4
# one GPU: one process (torchrun would need one GPU per process); 10 000 images in memory and
# into a file, then 20 000 out of core (1.6 GB) with a kill and a resume
run gram 120 bench/gram.py --checkpoint "$ckpt_dir/model.json" --n 10000 --processes 1 \
  --ooc-n 20000 --ooc-processes 1 --block-size 1024 --threads 4 --workdir "$results/gram-work"
rm -rf "$results/gram-work"

echo "all: $(( $(date +%s) - start )) s, exit $status"
exit $status
