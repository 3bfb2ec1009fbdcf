"""The ``manifoldlens`` command line. It parses arguments and calls the library; every command
writes a run directory (``--out``, default ``runs/<command>-<timestamp>``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="run directory (default runs/<command>-<time>)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1 ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument("--data", default=default,
                   help="digits, fashion-mnist, mnist, kmnist or an IDX directory")
    p.add_argument("--root", help="directory holding the dataset's IDX files")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manifoldlens",
        description="The geometry a trained classifier sees in its data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier, following the trace of G")
    _add_common(p)
    _add_data(p)
    p.add_argument("--arch", default="small_cnn",
                   choices=["small_cnn", "seed001_cnn", "mlp", "linear"])
    p.add_argument("--activation", help="relu, tanh or softplus (mlp, small_cnn)")
    p.add_argument("--hidden", type=_ints, help="hidden widths of an mlp, e.g. 128,128")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=60)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    p.add_argument("--limit", type=int, help="train on a stratified subset of this size")
    p.add_argument("--trace-every", type=int, default=50, help="steps between Tr G probes")
    p.add_argument("--probe-size", type=int, default=60)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-checkpoint", type=int, action="append", default=[],
                   help="also keep the checkpoint of this step (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")

    for name, helptext in (("spectrum", "statistics of G(x) over a split"),
                           ("gram", "the Jacobian correlation matrix M over a split")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="model checkpoint (.json, .safetensors or stem)")
        _add_common(p)
        _add_data(p, default=None)
        p.add_argument("--split", default="test", choices=["train", "test"])
        p.add_argument("--limit", type=int, help="a stratified subset of this many points")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--model-output", default="logits",
                       choices=["logits", "log_probs", "probs"])
        if name == "gram":
            p.add_argument("--output", default="softmax",
                           choices=["softmax", "log_softmax", "logits"])
            p.add_argument("--normalize", action="store_true", help="cosine of Jacobians")
            p.add_argument("--low-memory", action="store_true",
                           help="stream Jacobian blocks through a scratch file")

    leaf = sub.add_parser("leaf", help="seed 001 experiments: the foliation of a classifier")
    lsub = leaf.add_subparsers(dest="experiment", required=True)
    p = lsub.add_parser("train", help="Fig. 2: seed-001 CNN, SGD 60/0.01, trace of G; keeps "
                        "the step-10000 checkpoint")
    _add_common(p)
    _add_data(p, default="fashion-mnist")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--trace-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    for name, helptext in (
        ("across", "Fig. 3: steps across the leaves from test images"),
        ("horizontal", "Fig. 4: horizontal paths between test images"),
        ("mirror", "Fig. 5: horizontal paths towards mirrored images"),
        ("noisy", "Fig. 6: from a noisy image towards a valid one"),
        ("involutivity", "Theorem 3.1: Lie-bracket residuals outside D_x"),
    ):
        p = lsub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="model checkpoint (.json) e.g. from `leaf train`")
        _add_common(p)
        _add_data(p, default=None)
        p.add_argument("--split", default="test", choices=["train", "test"])
        p.add_argument("--model-output", default="logits",
                       choices=["logits", "log_probs", "probs"])
        p.add_argument("--n", type=int, default=20 if name == "horizontal" else 8,
                       help="points (or pairs)")
        if name != "involutivity":
            p.add_argument("--steps", type=int, default=1000 if name == "across" else 10000)
            p.add_argument("--step-size", type=float, default=0.1)
            p.add_argument("--record-every", type=int, default=10 if name == "across" else 50)
            p.add_argument("--resume", action="store_true", help="continue the run in --out")
        if name in ("horizontal", "mirror", "noisy"):
            p.add_argument("--tol", type=float, default=1.0)
            p.add_argument("--capped", action="store_true",
                           help="steps of min(α, ‖v‖): stop at the leaf's point nearest the "
                                "target instead of stepping α as Algorithm 1 does")
        if name == "noisy":
            p.add_argument("--noise-steps", type=int, default=250)
        if name != "involutivity":
            p.add_argument("--clamp", type=float, nargs=2, metavar=("LO", "HI"),
                           default=(0.0, 1.0),
                           help="keep points in the data domain (default 0 1, as the "
                                "seed-001 code does)")
            p.add_argument("--no-clamp", action="store_true", help="do not clamp")

    flow = sub.add_parser("flow", help="normalizing flows (NICE, RealNVP, Glow)")
    fsub = flow.add_subparsers(dest="experiment", required=True)
    p = fsub.add_parser("train", help="maximum-likelihood training on a 2-D toy or images")
    _add_common(p)
    p.add_argument("--data", default="two-moons",
                   help="two-moons, 8gaussians, checkerboard, rings, digits, fashion-mnist, "
                        "mnist, kmnist or an IDX directory")
    p.add_argument("--root", help="directory holding the dataset's IDX files")
    p.add_argument("--model", default=None, choices=["nice", "realnvp", "glow"],
                   help="default: realnvp for 2-D toys, glow for images")
    for flag, typ, helptext in (
            ("--levels", int, "Glow levels L"), ("--depth", int, "Glow steps per level K; "
                                                 "NICE/RealNVP MLP hidden layers"),
            ("--hidden-channels", int, "Glow/RealNVP conv channels"),
            ("--hidden", int, "NICE/RealNVP MLP width"), ("--couplings", int, "vector couplings"),
            ("--scales", int, "RealNVP scales"), ("--blocks", int, "RealNVP residual blocks")):
        p.add_argument(flag, type=typ, help=helptext)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    p.add_argument("--clip", type=float, default=100.0, help="gradient-norm clip (0: off)")
    p.add_argument("--n-bins", type=int, help="quantisation levels (default 17 for digits, "
                   "256 for IDX images)")
    p.add_argument("--limit", type=int, help="train on a subset of this size")
    p.add_argument("--test-limit", type=int, help="evaluate on a subset of this size")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for name, helptext in (("eval", "bits/dim (NLL for toys) of a trained flow"),
                           ("sample", "samples at several temperatures"),
                           ("interpolate", "latent interpolation between test images")):
        p = fsub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="flow checkpoint (.json), e.g. <run>/model.json")
        _add_common(p)
        if name != "sample":
            _add_data(p, default=None)
        if name == "eval":
            p.set_defaults(seed=None)  # default: the training seed recorded in the checkpoint
            p.add_argument("--split", default="test", choices=["train", "test"])
            p.add_argument("--limit", type=int)
            p.add_argument("--n-bins", type=int)
        elif name == "sample":
            p.add_argument("--n", type=int, default=64)
            p.add_argument("--temperatures", default="0.5,0.7,0.85,1.0",
                           type=lambda t: tuple(float(v) for v in t.split(",") if v))
        else:
            p.add_argument("--pairs", type=int, default=6)
            p.add_argument("--steps", type=int, default=9)
            p.add_argument("--method", default="linear", choices=["linear", "slerp"])

    man = sub.add_parser("manifold", help="seed 004: explanations against the data manifold")
    msub = man.add_subparsers(dest="experiment", required=True)
    p = msub.add_parser("vae", help="a (β-TC)VAE or autoencoder of the data manifold")
    _add_common(p)
    _add_data(p, default="fashion-mnist")
    p.add_argument("--model", default="betatcvae", choices=["betatcvae", "vae", "autoencoder"])
    p.add_argument("--size", type=int, default=32, help="images resized to size × size")
    p.add_argument("--latent", type=int, default=10)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=6.0)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--limit", type=int)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resume", action="store_true")
    p = msub.add_parser("dataset", help="a dataset on a known manifold (Algorithm 1)")
    p.add_argument("checkpoint", help="<run>/model.json of `manifold vae`")
    _add_common(p)
    p.add_argument("--root", help="directory of the source dataset's IDX files")
    p.add_argument("--approach", default="generative", choices=["generative", "reconstructive"])
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--upsample", type=int, help="bilinear upsampling to this side (MNIST256)")
    p.add_argument("--labeller-steps", type=int, default=2000)
    p = msub.add_parser("train", help="a classifier on a manifold dataset (Figure 6)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    _add_common(p)
    p.add_argument("--arch", default="seed001_cnn", choices=["seed001_cnn", "small_cnn", "mlp"])
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--adversarial", action="store_true", help="ℓ2-PGD adversarial training")
    p.add_argument("--eps", default="1,4,8", help="radii drawn at every step (seed 004: 1,4,8)")
    p.add_argument("--pgd-steps", type=int, default=100, help="PGD iterations (seed 004: 100)")
    p.add_argument("--fraction-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p = msub.add_parser("fraction", help="attributions in tangent space (Figures 2, 3, 7)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    p.add_argument("checkpoints", nargs="+", help="classifiers (<run>/model.json)")
    _add_common(p)
    p.add_argument("--names", help="comma-separated names of the classifiers")
    p.add_argument("--methods", default=",".join(("gradient", "input_x_gradient",
                                                  "integrated_gradients", "smoothgrad")))
    p.add_argument("--n", type=int, default=500, help="test images")
    p = msub.add_parser("roar", help="remove and retrain (Figure 5)")
    p.add_argument("dataset", help="run directory of `manifold dataset`")
    p.add_argument("checkpoint", help="the classifier whose attributions rank the pixels")
    _add_common(p)
    p.add_argument("--methods", default=",".join(("gradient", "input_x_gradient",
                                                  "integrated_gradients", "smoothgrad")))
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--remove", default="top", choices=["top", "bottom"])
    p.add_argument("--n-train", type=int)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--arch", default="seed001_cnn", choices=["seed001_cnn", "small_cnn", "mlp"])
    p.add_argument("--resume", action="store_true", help="continue the run in --out")

    p = sub.add_parser("demo", help="the whole story on the embedded digits, with a report")
    _add_common(p)
    p.add_argument("--steps", type=int, default=1500)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import experiments
    from .models import load_checkpoint
    from .runs import Run, default_run_dir

    torch.manual_seed(args.seed if args.seed is not None else 0)
    name = args.command + (f"-{args.experiment}" if args.command in ("leaf", "flow", "manifold")
                           else "")
    out = args.out or default_run_dir(name)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    progress = not args.no_progress
    resume = getattr(args, "resume", False)
    try:
        with Run(out, name, config, seed=args.seed, device=args.device,
                 resume=resume) as run:
            print(f"run directory: {run.path}", file=sys.stderr)
            if args.command == "train":
                opts = {k: v for k, v in (("activation", args.activation),
                                          ("hidden", args.hidden)) if v is not None}
                steps, epochs = args.steps, args.epochs
                if steps is None and epochs is None:
                    epochs = 10.0
                experiments.run_train(
                    run, data=args.data, root=args.root, arch=args.arch, arch_options=opts,
                    limit=args.limit, trace_every=args.trace_every, probe_size=args.probe_size,
                    resume=resume, progress=progress, optimizer=args.optimizer, lr=args.lr,
                    momentum=args.momentum, weight_decay=args.weight_decay,
                    batch_size=args.batch_size, steps=steps, epochs=epochs, seed=args.seed,
                    eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=tuple(args.keep_checkpoint), device=args.device,
                )
            elif args.command in ("spectrum", "gram"):
                model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
                ds = experiments.dataset_for(meta, args.data, args.split, args.root,
                                              args.limit, args.seed).to(args.device)
                if args.command == "spectrum":
                    experiments.run_spectrum(run, model, ds, model_output=args.model_output,
                                             batch_size=args.batch_size, progress=progress)
                else:
                    experiments.run_gram(
                        run, model, ds, output=args.output, model_output=args.model_output,
                        normalize=args.normalize, batch_size=args.batch_size,
                        low_memory=True if args.low_memory else None, progress=progress,
                    )
            elif args.command == "leaf":
                _leaf(args, run, progress, experiments)
            elif args.command == "flow":
                _flow(args, run, progress)
            elif args.command == "manifold":
                _manifold(args, run, progress)
            elif args.command == "demo":
                experiments.run_demo(run, steps=args.steps, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, TypeError) as e:
        print(f"manifoldlens {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {out}/run.json" + (f", {out}/report.html" if args.command == "demo" else ""),
          file=sys.stderr)
    return 0


def _leaf(args, run, progress: bool, experiments) -> None:
    from .models import load_checkpoint

    if args.experiment == "train":
        experiments.run_train(
            run, data=args.data, root=args.root, arch="seed001_cnn", trace_every=args.trace_every,
            probe_size=60, resume=args.resume, progress=progress, optimizer="sgd", lr=0.01,
            batch_size=60, steps=args.steps, seed=args.seed, eval_every=1000,
            checkpoint_every=1000, keep_checkpoints=(10000,), device=args.device,
        )
        return
    model, meta = load_checkpoint(args.checkpoint, map_location=args.device)
    ds = experiments.dataset_for(meta, args.data, args.split, args.root, None).to(args.device)
    common = {"model_output": args.model_output, "seed": args.seed}
    if args.experiment == "involutivity":
        experiments.run_leaf_involutivity(run, model, ds, n=args.n, **common)
        return
    common.update(steps=args.steps, step_size=args.step_size, record_every=args.record_every,
                  progress=progress)
    clamp = None if args.no_clamp else tuple(args.clamp)
    if args.experiment == "across":
        experiments.run_leaf_across(run, model, ds, n=args.n, clamp=clamp, **common)
    elif args.experiment in ("horizontal", "mirror"):
        experiments.run_leaf_horizontal(run, model, ds, pairs=args.n, tol=args.tol, clamp=clamp,
                                        mirror=args.experiment == "mirror", capped=args.capped,
                                        name=args.experiment, **common)
    else:
        experiments.run_leaf_noisy(run, model, ds, n=args.n, tol=args.tol, clamp=clamp,
                                   noise_steps=args.noise_steps, capped=args.capped, **common)


def _flow(args, run, progress: bool) -> None:
    from .flows import experiments as fx

    common = {"device": args.device, "seed": args.seed}
    if args.experiment == "train":
        kind = args.model or ("realnvp" if args.data in fx.TOYS else "glow")
        options = {k: getattr(args, k) for k in ("levels", "depth", "hidden_channels", "hidden",
                                                  "couplings", "scales", "blocks")}
        steps, epochs = args.steps, args.epochs
        if steps is None and epochs is None:
            steps = 2000
        fx.run_flow_train(
            run, data=args.data, root=args.root, kind=kind, model_options=options,
            limit=args.limit, test_limit=args.test_limit, n_bins=args.n_bins,
            resume=args.resume, progress=progress, lr=args.lr, batch_size=args.batch_size,
            steps=steps, epochs=epochs, warmup_steps=args.warmup,
            clip_grad_norm=args.clip or None, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, **common,
        )
    elif args.experiment == "eval":
        fx.run_flow_eval(run, args.checkpoint, data=args.data, root=args.root,
                         split=args.split, limit=args.limit, n_bins=args.n_bins, **common)
    elif args.experiment == "sample":
        fx.run_flow_sample(run, args.checkpoint, n=args.n, temperatures=args.temperatures,
                           **common)
    else:
        fx.run_flow_interpolate(run, args.checkpoint, data=args.data, root=args.root,
                                pairs=args.pairs, steps=args.steps, method=args.method, **common)


def _manifold(args, run, progress: bool) -> None:
    from . import manifold_experiments as mx

    common = {"device": args.device, "seed": args.seed}
    e = args.experiment
    if e == "vae":
        steps, epochs = args.steps, args.epochs
        if steps is None and epochs is None:
            epochs = 10.0
        mx.run_manifold_vae(run, data=args.data, root=args.root, kind=args.model,
                            size=args.size, latent_dim=args.latent, alpha=args.alpha,
                            beta=args.beta, gamma=args.gamma, limit=args.limit, steps=steps,
                            epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                            resume=args.resume, progress=progress, **common)
    elif e == "dataset":
        mx.run_manifold_dataset(run, args.checkpoint, n_train=args.n_train, n_test=args.n_test,
                                approach=args.approach, upsample=args.upsample,
                                labeller_steps=args.labeller_steps, root=args.root,
                                progress=progress, seed=args.seed)
    elif e == "train":
        adv = None
        if args.adversarial:
            adv = {"eps": tuple(float(v) for v in args.eps.split(",") if v),
                   "steps": args.pgd_steps}
        mx.run_manifold_train(run, args.dataset, arch=args.arch, epochs=args.epochs,
                              lr=args.lr, batch_size=args.batch_size, adversarial=adv,
                              fraction_every=args.fraction_every, resume=args.resume,
                              progress=progress, **common)
    elif e == "fraction":
        names = args.names.split(",") if args.names else None
        mx.run_manifold_fraction(run, args.checkpoints, args.dataset,
                                 methods=tuple(m for m in args.methods.split(",") if m),
                                 n=args.n, names=names, **common)
    else:
        mx.run_manifold_roar(run, args.checkpoint, args.dataset,
                             methods=tuple(m for m in args.methods.split(",") if m),
                             fractions=tuple(float(v) for v in args.fractions.split(",") if v),
                             n_train=args.n_train, arch=args.arch, epochs=args.epochs,
                             remove=args.remove, progress=progress, resume=args.resume,
                             **common)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
