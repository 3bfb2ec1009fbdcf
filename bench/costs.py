"""What the README's steps cost: wall and CPU seconds of each, best of ``--repeats``.

    python bench/costs.py [--only classifier,flow,path,autoencoder] [--repeats 2] [--threads 1]
                          [--device cpu|cuda]

- ``classifier``: ``train_classifier`` of the README's small CNN on the digits, 400 steps;
- ``flow``: ``train_flow`` of the README's Glow (2 levels, depth 2, 32 channels) on the
  digits, ``--flow-steps`` steps (2000);
- ``path``: ``horizontal_path`` of 8 pairs of test digits for 1000 steps (``tol=0``, so no
  pair stops early unless it stalls; the steps taken are reported);
- ``autoencoder``: ``train_generative`` of the README's autoencoder, 500 steps.

CPU seconds (``time.process_time``) are reported beside wall seconds: on a shared machine
the wall time grows with the others' load, the CPU time of a one-thread run much less.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import add_device, loadavg, make_logger, print_json, run_metadata, sync
from manifoldlens import horizontal_path
from manifoldlens.data import load_dataset
from manifoldlens.flows import Glow
from manifoldlens.flows.training import train_flow
from manifoldlens.generative import AutoEncoder, train_generative
from manifoldlens.models import create_model
from manifoldlens.training import train_classifier

log = make_logger("costs")
TASKS = ("classifier", "flow", "path", "autoencoder")


def _timed(fn, repeats: int) -> tuple[dict[str, object], object]:
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    best = min(range(repeats), key=walls.__getitem__)
    return {"wall_s_best": round(walls[best], 2), "cpu_s_of_best": round(cpus[best], 2),
            "wall_s_all": [round(v, 2) for v in walls]}, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flow-steps", type=int, default=2000)
    p.add_argument("--path-steps", type=int, default=1000)
    add_device(p)
    args = p.parse_args()
    tasks = args.only.split(",")
    if unknown := set(tasks) - set(TASKS):
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(TASKS)}")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be ≥ 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = run_metadata("costs")
    meta.update(repeats=args.repeats, device=args.device, loadavg_at_start=loadavg())
    dev = args.device
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    results: dict[str, object] = {}

    def classifier():
        torch.manual_seed(0)
        model = create_model("small_cnn", train.shape, train.num_classes)
        return train_classifier(model, train, test_data=test, steps=400, momentum=0.9,
                                progress=False, device=dev).model

    if "classifier" in tasks or "path" in tasks:
        log("classifier: 400 steps")
        timing, model = _timed(classifier, args.repeats if "classifier" in tasks else 1)
        if "classifier" in tasks:
            results["classifier_400_steps"] = timing
    if "flow" in tasks:
        log(f"flow: {args.flow_steps} steps")

        def flow():
            torch.manual_seed(0)
            glow = Glow((1, 8, 8), levels=2, depth=2, hidden_channels=32)
            return train_flow(glow, train.images, test_data=test.images, n_bins=17,
                              steps=args.flow_steps, progress=False, device=dev)

        results[f"flow_glow_{args.flow_steps}_steps"] = _timed(flow, args.repeats)[0]
    if "path" in tasks:
        log(f"path: 8 pairs × {args.path_steps} steps")
        x = test.images[:16].to(dev)
        timing, path = _timed(lambda: horizontal_path(
            model, x[:8], x[8:], step_size=0.05, max_steps=args.path_steps, tol=0.0,
            progress=False), args.repeats)
        timing["steps_taken"] = [int(s) for s in path.steps]
        timing["status"] = list(path.status)
        results[f"horizontal_path_8_pairs_{args.path_steps}_steps"] = timing
    if "autoencoder" in tasks:
        log("autoencoder: 500 steps")

        def autoencoder():
            torch.manual_seed(0)
            ae = AutoEncoder((1, 8, 8), latent_dim=6, network="mlp", hidden=128)
            return train_generative(ae, train.images, steps=500, lr=2e-3, progress=False,
                                    device=dev)

        results["autoencoder_500_steps"] = _timed(autoencoder, args.repeats)[0]
    print_json({"meta": meta, "results": results}, t0)


if __name__ == "__main__":
    main()
