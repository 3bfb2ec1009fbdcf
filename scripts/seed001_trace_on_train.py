"""Mean trace of G on training images for every kept checkpoint of a ``leaf train`` run.

The seed-001 code follows Tr G on a fixed batch of the first 1000 *training* images
(``mnist_training.py``); ``leaf train`` follows it on 60 test images. This measures the
reference's quantity after the fact, on the first ``--n`` training images, for each
``checkpoints/step-*.json`` of a run (the paper's checkpoint criterion: the smoothed mean trace
back near its starting value; step 0 is a freshly initialised network with the run's seed).

    python scripts/seed001_trace_on_train.py RUN_DIR [--n 200]

Writes ``RUN_DIR/trace_on_train.json`` and prints one line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import manifoldlens.commands.leaf  # noqa: F401  (registers the normalised CNN)
from manifoldlens.data import load_dataset
from manifoldlens.information import local_data_matrix
from manifoldlens.models import build_model, load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = Path(args.run)
    ckpts = sorted((run / "checkpoints").glob("step-*.json"))
    meta = json.loads(ckpts[0].read_text())
    x = load_dataset(meta["metadata"]["data"], "train").images[: args.n]
    torch.manual_seed(args.seed)  # the run's initialisation (run_train seeds before building)
    models = [(0, build_model(meta["spec"]))]
    models += [(int(c.name[5:13]), load_checkpoint(c)[0]) for c in ckpts]
    out = []
    for step, model in models:
        t0 = time.time()
        model.eval()
        G = local_data_matrix(model, x)
        tr = G.trace
        rec = {"step": step, "mean_trace": float(tr.mean()), "median_trace": float(tr.median()),
               "seconds": round(time.time() - t0, 1)}
        out.append(rec)
        print(json.dumps(rec), flush=True)
    (run / "trace_on_train.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
