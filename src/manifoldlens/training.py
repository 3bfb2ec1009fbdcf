"""Classifier training with callbacks, deterministic seeding, checkpoints and resume.

Grementieri & Fioresi train the PyTorch-MNIST-example CNN with SGD, batch 60, learning rate
0.01 (:data:`SEED001_DEFAULTS`) and follow the mean trace of G on a batch during training
(Figure 2): :class:`~manifoldlens.callbacks.TraceOfG`, a callback of this loop.

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289. §4, Figure 2.

S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. Appendix A.

A. Madry, A. Makelov, L. Schmidt, D. Tsipras, A. Vladu. "Towards Deep Learning Models Resistant
to Adversarial Attacks." ICLR 2018. arXiv:1706.06083.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_number,
    check_positive_int,
    has_batch_norm,
)
from ._utils import (
    differing,
    eval_mode,
    json_text,
    latest_checkpoint,
    model_fingerprint,
    progress_bar,
    tensor_sha256,
    to_scores,
)
from .jacobian import ModelOutput
from .models import checkpoint_metadata, load_weights, save_checkpoint
from .runs import Run

__all__ = [
    "SEED001_DEFAULTS",
    "Callback",
    "TrainState",
    "TrainResult",
    "check_schedule",
    "evaluate",
    "RunOptions",
    "fit",
    "pgd_l2",
    "train_classifier",
]

#: Grementieri & Fioresi, §4: SGD, batch size 60, fixed learning rate 0.01.
SEED001_DEFAULTS = {"optimizer": "sgd", "lr": 0.01, "batch_size": 60, "momentum": 0.0}


def _tensors(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "images") and hasattr(data, "labels"):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise TypeError(f"{name} must be an ImageDataset or an (x, y) pair of tensors")


def _loss(out: torch.Tensor, y: torch.Tensor, model_output: str) -> torch.Tensor:
    return F.cross_entropy(to_scores(out, model_output), y)


def pgd_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 100,
    step_size: float | torch.Tensor | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    model_output: ModelOutput = "logits",
) -> torch.Tensor:
    """ℓ2 projected gradient ascent on the cross-entropy (Madry et al.; Bordt et al., appendix A).

    ``δ ← Π_{‖δ‖₂ ≤ ε}(δ + α g/‖g‖₂)``, g = ∇_x CE(model(x + δ), y), α = ``step_size``
    (default 2.5 ε / steps, as in Bordt et al.), then x + δ clamped to the data domain.
    ``eps`` may be a float or one radius per sample (n,). Returns the adversarial inputs (detached).
    """
    check_batch(x, "x")
    n = x.shape[0]
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(n).clone()
    if (eps_t < 0).any():
        raise ValueError("eps must be >= 0")
    alpha = (2.5 * eps_t / max(steps, 1) if step_size is None
             else torch.as_tensor(step_size, dtype=x.dtype, device=x.device).expand(n))
    view = (-1,) + (1,) * (x.ndim - 1)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(to_scores(model(x + delta), model_output), y,
                                   reduction="sum")
            (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            gn = g.reshape(n, -1).norm(dim=1).clamp_min(1e-12)
            delta = delta + (alpha / gn).view(view) * g
            dn = delta.reshape(n, -1).norm(dim=1)
            delta = delta * torch.clamp(eps_t / dn.clamp_min(1e-12), max=1.0).view(view)
            if clamp is not None:
                delta = (x + delta).clamp(*clamp) - x
    return (x + delta).detach()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 1000,
    model_output: ModelOutput = "logits",
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (eval mode, restored after)."""
    x, y = _tensors(data, "data")
    device = device or next(model.parameters()).device
    total, correct, n = 0.0, 0, x.shape[0]
    with eval_mode(model):
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            s = to_scores(model(xb), model_output)
            total += float(F.cross_entropy(s, yb, reduction="sum"))
            correct += int((s.argmax(1) == yb).sum())
    return {"loss": total / n, "accuracy": correct / n}


@dataclass
class TrainState:
    """What callbacks see at each step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    loss: float = float("nan")
    run: Run | None = None
    model_output: str = "logits"
    metrics: dict[str, float] = field(default_factory=dict)


class Callback:
    """Hooks into :func:`train_classifier`. ``state_dict`` goes into checkpoints."""

    def on_train_start(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        pass

    def on_step(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        pass

    def on_train_end(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    def config(self) -> dict[str, Any]:
        """The settings that shape what this callback records (part of a run's fingerprint:
        a resume with other settings is refused)."""
        return {}


@dataclass
class TrainResult:
    model: nn.Module
    step: int
    history: list[dict[str, float]]
    metrics: dict[str, float]
    checkpoint: Path | None = None


def _make_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


#: What a resumed run may never change: it continues the same model on the same data.
_FIXED = frozenset({"model", "data", "seed", "n_train", "callbacks"})


@dataclass(frozen=True)
class RunOptions:
    """The run bookkeeping every trainer shares (:func:`train_classifier`,
    :func:`~manifoldlens.flows.training.train_flow`,
    :func:`~manifoldlens.generative.train_generative`, :func:`fit`).

    Parameters
    ----------
    run : Run, optional
        The run directory: metrics go to its ``metrics.jsonl``, checkpoints under
        ``<run>/checkpoints/``.
    checkpoint_every : int, optional
        Steps between checkpoints (model as safetensors, optimizer, callbacks, RNG state;
        None or 0: none); only the latest is kept, plus the steps in ``keep_checkpoints``.
    keep_checkpoints : tuple of int
        Steps whose checkpoints are never deleted (e.g. Grementieri & Fioresi's step 10 000).
    resume : bool
        Continue from the latest checkpoint of ``run``. Refused, naming the fields, when what
        produced it differs from this call: the training settings, the model (its spec or
        class and parameter shapes) or the data (size, shape, sha256 of inputs and labels).
        The number of steps may always change.
    metadata : dict
        Stored in every checkpoint (e.g. the dataset's name and classes).
    allow_changes : tuple of str
        Settings that may differ on resume (e.g. ``("lr",)`` to go on with a lower learning
        rate after a ``FloatingPointError``); each change is applied, logged to the run's
        ``metrics.jsonl`` (``"resume"`` records) and kept in the checkpoints' history.

    A trainer's ``run=`` also takes a bare :class:`~manifoldlens.runs.Run` (no checkpoints,
    no resume) or None (nothing recorded).
    """

    run: Run | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: tuple[int, ...] = ()
    resume: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    allow_changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_checkpoints", tuple(int(k) for k in self.keep_checkpoints))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        object.__setattr__(self, "allow_changes", tuple(self.allow_changes))
        fixed = sorted(set(self.allow_changes) & _FIXED)
        if fixed:
            raise ValueError(f"allow_changes cannot include {fixed}: a resumed run continues "
                             "the same model on the same data; start a new run instead")
        check_positive_int(self.checkpoint_every, "checkpoint_every", minimum=0,
                           allow_none=True)
        if self.checkpoint_every == 0:  # 0: no checkpoints, as None
            object.__setattr__(self, "checkpoint_every", None)
        if (self.checkpoint_every or self.resume) and self.run is None:
            raise ValueError("checkpoints and resume need a run directory "
                             "(RunOptions(run=Run(...), ...))")

    @classmethod
    def of(cls, run: Run | RunOptions | None) -> RunOptions:
        """``run`` as options: a bare :class:`Run` records metrics only."""
        if isinstance(run, RunOptions):
            return run
        if run is None or isinstance(run, Run):
            return cls(run=run)
        raise TypeError(f"run must be a Run, RunOptions or None, got {type(run).__name__}")


def train_classifier(
    model: nn.Module,
    train_data: Any,
    *,
    test_data: Any = None,
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 60,
    epochs: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    model_output: ModelOutput = "logits",
    callbacks: Sequence[Callback] = (),
    eval_every: int | None = None,
    run: Run | RunOptions | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    adversarial: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a classifier by minimising cross-entropy; defaults (SGD, 60, 0.01) as in
    Grementieri & Fioresi.

    ``adversarial={"eps": (1, 4, 8), "steps": 100}`` trains on ℓ2-PGD adversarial examples
    (:func:`pgd_l2`; Bordt et al.: ε drawn from {1, 4, 8} at every step, 100 iterations of
    2.5 ε/100; fewer iterations are the CPU knob), with ``"clamp"`` (default (0, 1)).

    Deterministic: epoch e visits the training set in the order of
    ``randperm(n, generator=seed + e)``, so a run resumed from a checkpoint takes the same
    steps it would have taken uninterrupted. ``run=RunOptions(run, checkpoint_every=…,
    keep_checkpoints=…, resume=…, metadata=…)`` saves the model (safetensors), optimizer and
    callback states under ``<run>/checkpoints/`` and resumes from the latest one. A NaN/Inf
    loss stops training with ``FloatingPointError`` and the last good checkpoint is kept.

    Training length: ``steps`` or ``epochs`` (one of them; ``epochs`` may be fractional).
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    x, y = _tensors(train_data, "train_data")
    check_schedule(x.shape[0], batch_size, epochs, steps)  # before the model is touched
    train_config = {"optimizer": optimizer, "lr": lr, "momentum": momentum,
                    "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed,
                    "model_output": model_output, "n_train": x.shape[0], "adversarial": None}
    adv = None
    if adversarial:
        adv = {"eps": (1.0, 4.0, 8.0), "steps": 100, "clamp": (0.0, 1.0), **adversarial}
        adv["eps"] = tuple(float(e) for e in adv["eps"])
        train_config["adversarial"] = {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in adv.items()}
    torch.manual_seed(seed)
    model.to(device)
    opt = _make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)

    def step_loss(xb, yb, step):
        if adv is not None:  # ε of this step: a function of (seed, step), resumable
            g = torch.Generator().manual_seed(seed * 7919 + step)
            eps = adv["eps"][int(torch.randint(len(adv["eps"]), (1,), generator=g))]
            with eval_mode(model):
                xb = pgd_l2(model, xb, yb, eps, steps=adv["steps"], clamp=adv["clamp"],
                            model_output=model_output)
        return _loss(model(xb), yb, model_output)

    def run_eval():
        m = evaluate(model, test_data, model_output=model_output, device=device)
        return {"test_loss": m["loss"], "test_accuracy": m["accuracy"]}

    return fit(model, x, y, step_loss, opt, batch_size=batch_size, epochs=epochs, steps=steps,
               seed=seed, callbacks=callbacks, evaluate_fn=run_eval if test_data is not None
               else None, eval_every=eval_every, run=run, device=device, progress=progress,
               train_config=train_config, model_output=model_output)


class _Checkpoints:
    """Checkpoints of one :func:`fit` call: resume from the latest, save, prune old ones."""

    def __init__(self, options: RunOptions, model: nn.Module, opt: torch.optim.Optimizer,
                 callbacks: Sequence[Callback], train_config: dict[str, Any] | None,
                 per_epoch: int, data: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.options, self.model, self.opt = options, model, opt
        self.callbacks, self.per_epoch = callbacks, per_epoch
        x, y = data  # what produced the checkpoints: settings, model and data fingerprints
        keeps = bool(options.checkpoint_every or options.resume)  # else no one compares them
        self.train_config = json.loads(json_text({
            **(train_config or {}), "model": model_fingerprint(model, weights=False),
            "data": {"n": x.shape[0], "shape": list(x.shape[1:]),
                     "sha256": tensor_sha256(x, y) if keeps else None},
            "callbacks": [{"type": type(cb).__name__, **cb.config()} for cb in callbacks]
            if keeps else [],
        }))  # as JSON gives it back: tuples compare as the lists a checkpoint holds
        unknown = sorted(set(options.allow_changes) - set(self.train_config))
        if unknown:
            raise ValueError(f"allow_changes names unknown settings {unknown}; settings: "
                             f"{sorted(k for k in self.train_config if k not in _FIXED)}")
        run = options.run
        self.directory = run.path / "checkpoints" if run is not None else None
        self.last: Path | None = None
        self.resumes: list[dict[str, Any]] = []  # settings changed at each resume

    def resume(self, state: TrainState, device: torch.device, total: int
               ) -> list[dict[str, float]]:
        """Load the latest checkpoint into the model, optimizer, callbacks, RNG and ``state``;
        returns the evaluation history stored with it (empty when there is none)."""
        if not self.options.resume or self.directory is None:
            return []
        latest = latest_checkpoint(self.directory)
        if latest is None:
            return []
        meta = checkpoint_metadata(latest)
        _check_resume_metadata(meta, latest)
        if int(meta.get("step", 0)) > total:
            raise ValueError(f"cannot resume {latest}: the run is at step {meta.get('step')}, "
                             f"past the {total} steps asked for; ask for more steps")
        saved = meta.get("train_config")
        changed = {}
        if saved is not None:  # fields an older checkpoint did not record are not compared
            diff = [k for k in differing(saved, self.train_config) if k in saved]
            refused = [k for k in diff if k not in self.options.allow_changes]
            if refused:
                shown = {k: (_short(saved.get(k)), _short(self.train_config.get(k)))
                         for k in refused}
                raise ValueError(
                    f"cannot resume from {latest}: it was trained with other settings "
                    f"({', '.join(refused)}): (checkpoint, now) = {shown}; pass the same settings, "
                    "allow a setting to change explicitly (RunOptions(allow_changes=...), CLI "
                    "--allow-change), or start a new run"
                )
            changed = {k: [saved.get(k), self.train_config.get(k)] for k in diff}
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        meta = load_weights(latest, self.model, optimizer=self.opt, map_location=device)
        for group, now in zip(self.opt.param_groups, hyper, strict=True):
            group.update(now)  # this call's settings (equal, or changes that were allowed)
        state.step = int(meta["step"])
        self.resumes = list(meta.get("resumes", []))
        if changed:
            self.resumes.append({"step": state.step, "changed": changed})
            self.options.run.log(resume={"step": state.step, "changed": changed})
        self.options.run.truncate_log(state.step)  # records logged after it are redone
        state.metrics = dict(meta.get("metrics") or {})
        for cb, cb_state in zip(self.callbacks, meta.get("callbacks", []), strict=False):
            cb.load_state_dict(cb_state)
        if "rng_state" in meta:
            torch.set_rng_state(torch.tensor(meta["rng_state"], dtype=torch.uint8))
        if meta.get("cuda_rng_state") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.tensor(st, dtype=torch.uint8) for st in meta["cuda_rng_state"]]
            )
        self.last = latest
        return list(meta.get("history", []))

    def save(self, state: TrainState, history: list[dict[str, float]]) -> Path:
        step = state.step
        meta = {
            **self.options.metadata,
            "step": step,
            "epoch": step / self.per_epoch,
            "metrics": state.metrics,
            "history": history,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng_state": torch.get_rng_state().tolist(),
            "cuda_rng_state": ([st.tolist() for st in torch.cuda.get_rng_state_all()]
                               if torch.cuda.is_available() else None),
            "train_config": self.train_config,
            "resumes": self.resumes,
        }
        path = save_checkpoint(self.directory / f"step-{step:08d}", self.model, metadata=meta,
                               optimizer=self.opt)
        if self.last is not None and self.last != path:
            old_step = int(self.last.name[5:13])
            if old_step not in self.options.keep_checkpoints:
                for suffix in (".json", ".safetensors", ".optim.pt"):
                    Path(str(self.last)[: -len(".json")] + suffix).unlink(missing_ok=True)
        self.last = path
        self.options.run.checkpoint_state()
        return path

    def saved_at(self, step: int) -> bool:
        return self.last is not None and str(self.last).endswith(f"step-{step:08d}.json")


def _short(value: Any) -> Any:
    """A setting as an error message shows it (fingerprints shortened)."""
    if isinstance(value, dict) and ("sha256" in value or "structure_sha256" in value):
        return {k: (v[:12] + "…" if isinstance(v, str) and len(v) == 64 else v)
                for k, v in value.items()}
    return value


def check_schedule(n: int, batch_size: int, epochs: float | None, steps: int | None, *,
                   warmup_steps: int = 0, clip_grad_norm: float | None = None,
                   merge_single: bool = False) -> tuple[int, int]:
    """Validate a training schedule before anything runs; returns ``(steps per epoch, total
    steps)``. ``batch_size`` must not exceed the ``n`` points; ``clip_grad_norm`` must be None
    (no clipping) or > 0: a negative norm would turn descent into ascent and 0 would freeze
    the model. ``merge_single``: a last batch of one point joins the one before it (BatchNorm
    in train mode cannot normalise a single point)."""
    check_positive_int(batch_size, "batch_size")
    if batch_size > n:  # every batch would hold all n points, not the batch_size recorded
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training points; give at "
                         f"most {n}")
    check_positive_int(warmup_steps, "warmup_steps", minimum=0)
    check_number(clip_grad_norm, "clip_grad_norm", low=0.0, strict=True, allow_none=True)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    check_positive_int(steps, "steps", minimum=0, allow_none=True)
    check_number(epochs, "epochs", low=0.0, allow_none=True)
    per_epoch = math.ceil(n / batch_size)
    if merge_single and n % batch_size == 1 and n > batch_size:
        per_epoch -= 1
    total = steps if steps is not None else int(round(epochs * per_epoch))
    return per_epoch, total


_RESUME_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,), "train_config": (dict,), "resumes": (list,), "metrics": (dict,),
    "callbacks": (list,), "history": (list,), "rng_state": (list,), "cuda_rng_state": (list,),
}


def _check_resume_metadata(meta: dict[str, Any], path: Path) -> None:
    """A checkpoint's training fields have the types :meth:`_Checkpoints.save` writes; a
    hand-edited or hostile one is refused by name instead of failing deep inside."""
    for key, kinds in _RESUME_FIELDS.items():
        value = meta.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"cannot resume from {path}: its metadata field {key!r} should be "
                             f"a {kinds[0].__name__}, got {type(value).__name__}")
    if meta.get("step", 0) < 0:
        raise ValueError(f"cannot resume from {path}: its step is negative ({meta['step']})")
    rng = meta.get("rng_state")
    if rng is not None and (len(rng) != torch.get_rng_state().numel() or not all(
            isinstance(b, int) and 0 <= b <= 255 for b in rng)):
        raise ValueError(f"cannot resume from {path}: its rng_state is not a CPU generator "
                         "state")
    for key in ("history", "resumes", "callbacks"):
        if not all(isinstance(r, dict) for r in meta.get(key) or []):
            raise ValueError(f"cannot resume from {path}: its metadata field {key!r} should "
                             "hold objects")


def _warm_up(opt: torch.optim.Optimizer, base_lrs: list[float], ramp: float) -> None:
    for g, base in zip(opt.param_groups, base_lrs, strict=True):
        g["lr"] = base * ramp


def _show(bar: Any, state: TrainState) -> None:
    bar.set_postfix({"loss": f"{state.loss:.3f}",
                     **{k: f"{v:.3f}" for k, v in state.metrics.items()}}, refresh=False)


def _nonfinite(what: str, value: float, step: int, opt: torch.optim.Optimizer,
               clip_grad_norm: float | None, last: Path | None) -> FloatingPointError:
    where = f"; last good checkpoint: {last}" if last else ""
    lrs = ", ".join(f"{g['lr']:.3g}" for g in opt.param_groups)
    return FloatingPointError(
        f"{what} became {value} at step {step} (lr={lrs}); lower the learning "
        f"rate{' or clip gradients' if clip_grad_norm is None else ''}{where}"
    )


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    step_loss: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    epochs: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    evaluate_fn: Callable[[], dict[str, float]] | None = None,
    eval_every: int | None = None,
    run: Run | RunOptions | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    train_config: dict[str, Any] | None = None,
    warmup_steps: int = 0,
    clip_grad_norm: float | None = None,
    desc: str = "train",
    model_output: str = "logits",
) -> TrainResult:
    """The training loop shared by classifiers, flows and autoencoders.

    ``step_loss(x_batch, y_batch, step)`` returns the loss of one minibatch (``y`` may be
    None). Batches follow ``randperm(n, generator=seed + epoch)``; checkpoints
    (:class:`RunOptions`) hold the model, the optimizer, the callbacks and the RNG state, so a
    resumed run equals an uninterrupted one. ``warmup_steps`` ramps every learning rate
    linearly from 0 (stateless, so resuming needs nothing more); ``clip_grad_norm`` clips the
    gradient's global norm. A NaN/Inf loss or gradient stops with ``FloatingPointError``
    naming the last good checkpoint. ``evaluate_fn()`` returns test metrics, logged every
    ``eval_every`` steps and at the end."""
    check_batch(x, "train_data")
    options = RunOptions.of(run)
    run = options.run  # the directory; options hold the checkpoint settings
    n = x.shape[0]
    per_epoch, total = check_schedule(n, batch_size, epochs, steps, warmup_steps=warmup_steps,
                                      clip_grad_norm=clip_grad_norm,
                                      merge_single=has_batch_norm(model))
    device, opt = torch.device(device), optimizer
    base_lrs = [g["lr"] for g in opt.param_groups]
    state = TrainState(model, opt, run=run, model_output=model_output)
    ckpts = _Checkpoints(options, model, opt, callbacks, train_config, per_epoch, (x, y))
    history = ckpts.resume(state, device, total)

    def run_eval() -> None:
        if evaluate_fn is None:
            return
        state.metrics = dict(evaluate_fn())
        rec = {"step": state.step, "epoch": state.step / per_epoch, **state.metrics}
        history.append(rec)
        if run is not None:
            run.log(eval=rec)

    def stop(what: str, value: float) -> None:
        raise _nonfinite(what, value, state.step + 1, opt, clip_grad_norm, ckpts.last)

    def train_step(xb: torch.Tensor, yb: torch.Tensor | None) -> None:
        if warmup_steps:
            _warm_up(opt, base_lrs, min(1.0, (state.step + 1) / warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss = step_loss(xb, yb, state.step)
        if not torch.isfinite(loss):
            stop("loss", float(loss.detach()))
        loss.backward()
        # the global gradient norm, clipped or not: a finite loss can still have a NaN/Inf
        # gradient, which must never reach the weights (or a checkpoint)
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), clip_grad_norm if clip_grad_norm is not None else float("inf"))
        if not torch.isfinite(norm):
            stop("the gradient norm", float(norm))
        opt.step()
        state.step += 1
        state.loss = float(loss.detach())

    def after_step(bar: Any) -> None:
        if run is not None and state.step % max(1, min(per_epoch // 10, 100)) == 0:
            run.log(step=state.step, loss=state.loss)
        for cb in callbacks:
            cb.on_step(state)
        if eval_every and state.step % eval_every == 0:
            run_eval()
        if options.checkpoint_every and state.step % options.checkpoint_every == 0:
            ckpts.save(state, history)
        if bar is not None:
            bar.update(1)
            if state.step % 10 == 0 or state.step == total:
                _show(bar, state)

    model.train()
    for cb in callbacks:
        cb.on_train_start(state)
    bar = progress_bar(enabled=progress, total=total, initial=state.step, desc=desc, unit="step",
                       dynamic_ncols=True, mininterval=0.5)
    try:
        while state.step < total:
            epoch, offset = divmod(state.step, per_epoch)
            state.epoch = epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for b in range(offset, per_epoch):
                if state.step >= total:
                    break
                idx = perm[b * batch_size : n if b == per_epoch - 1 else (b + 1) * batch_size]
                train_step(x[idx].to(device), y[idx].to(device) if y is not None else None)
                after_step(bar)
    finally:
        if bar is not None:
            bar.close()

    if not history or history[-1]["step"] != state.step:
        run_eval()
    for cb in callbacks:
        cb.on_train_end(state)
    if options.checkpoint_every and not ckpts.saved_at(state.step):
        ckpts.save(state, history)
    model.eval()
    if run is not None:
        run.metrics.update({**state.metrics, "steps": state.step})
    return TrainResult(model, state.step, history, dict(state.metrics), ckpts.last)
