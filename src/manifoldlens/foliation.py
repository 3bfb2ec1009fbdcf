"""Moving along and across the foliation that G(x) induces (Grementieri & Fioresi, §3–4).

``D_x = (ker G(x))^⊥`` is the tangent space of the leaf through x (Theorem 3.1).

* :func:`horizontal_path` — Algorithm 1: ``x_t = x_{t−1} + α v/‖v‖`` with
  ``v = P_{D_{x_{t−1}}}(target − x_{t−1})``, until ``‖target − x‖ < tol``.
* :func:`leaf_crossing_path` — §4.2: ``v = P_{ker G(x_t)} r`` for a fixed random r.
* :func:`involutivity_residual` — the Frobenius condition: the part of the Lie brackets
  ``[∇log p_i, ∇log p_j] = H_j ∇log p_i − H_i ∇log p_j`` outside D_x.

Paths are batched: n points advance together, each stops on its own (target reached,
NaN/Inf, or no admissible direction left).

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289.
§3–4, Theorem 3.1, Algorithm 1, App. B.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._checks import (
    MODEL_OUTPUTS,
    check_batch,
    check_choice,
    check_independent_samples,
    check_number,
    check_positive_int,
)
from ._utils import (
    differing,
    model_fingerprint,
    predict_probs,
    progress_bar,
    sha256_file,
    tensor_sha256,
    to_scores,
    write_atomic,
)
from .information import LocalDataMatrix, check_top_k, local_data_matrix, top_k_jacobian
from .jacobian import (
    ModelOutput,
    count_classes,
    jacobian_chunk_size,
    score_jacobian,
    transform_jacobian,
)
from .memory import check_max_memory, resolve_max_memory

__all__ = [
    "PathResult",
    "InvolutivityResult",
    "horizontal_path",
    "leaf_crossing_path",
    "involutivity_residual",
]

#: Status of each path when it stopped.
RUNNING, REACHED, MAX_STEPS, NONFINITE, STALLED = (
    "running", "reached", "max_steps", "nonfinite", "stalled",
)


@dataclass
class PathResult:
    """Recorded states of a batch of paths.

    Attributes
    ----------
    points : Tensor (T, n, *shape)
        Positions at the recorded steps (:attr:`record_steps`); a path that stopped keeps its
        last position.
    distances : Tensor (T, n)
        ‖target − x‖ at the recorded steps (distance from the start for leaf crossings).
    probs : Tensor (T, n, C)
        Model probabilities at the recorded steps.
    steps : Tensor (n,)
        Steps taken by each path.
    reached : Tensor (n,) bool
        Whether the path came within ``tol`` of its target.
    status : list[str]
        ``"reached"``, ``"max_steps"``, ``"nonfinite"`` (NaN/Inf appeared: the path stopped at
        its last finite point) or ``"stalled"`` (the admissible direction vanished).
    length : Tensor (n,)
        Euclidean length of the path, Σ ‖x_t − x_{t−1}‖.
    record_steps : Tensor (T,)
        The step index of each record.
    """

    points: torch.Tensor
    distances: torch.Tensor
    probs: torch.Tensor
    steps: torch.Tensor
    reached: torch.Tensor
    status: list[str]
    length: torch.Tensor
    record_steps: torch.Tensor
    residuals: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def final(self) -> torch.Tensor:
        """Final positions (n, *shape)."""
        return self.points[-1]


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


class _Recorder:
    def __init__(self, record_every: int) -> None:
        self.every = max(1, int(record_every))
        self.points: list[torch.Tensor] = []
        self.dist: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.residuals: list[torch.Tensor] = []
        self.steps: list[int] = []

    def add(self, step, x, dist, probs, resid) -> None:
        self.points.append(x.detach().cpu().clone())
        self.dist.append(dist.detach().cpu().clone())
        self.probs.append(probs.detach().cpu().clone())
        self.residuals.append(resid.detach().cpu().clone())
        self.steps.append(step)

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "rec_points": torch.stack(self.points),
            "rec_dist": torch.stack(self.dist),
            "rec_probs": torch.stack(self.probs),
            "rec_resid": torch.stack(self.residuals),
            "rec_steps": torch.tensor(self.steps),
        }

    def load(self, st: dict[str, torch.Tensor]) -> None:
        self.points = list(st["rec_points"])
        self.dist = list(st["rec_dist"])
        self.probs = list(st["rec_probs"])
        self.residuals = list(st["rec_resid"])
        self.steps = st["rec_steps"].tolist()


@dataclass(frozen=True)
class _Walk:
    """What one call's paths follow and how they step.

    ``direction(G, x_a, idx)`` is the vector v to follow at the running points ``x_a`` (rows
    ``idx`` of the batch); ``distance(x)`` the recorded distance (n,); ``reference(x_a, idx)``
    the length of the vector that was projected, against which a vanishing v is judged;
    ``off(G, Δ)`` the part of a step Δ outside the distribution followed.
    """

    kind: str
    direction: Callable[[LocalDataMatrix, torch.Tensor, torch.Tensor], torch.Tensor]
    distance: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    off: Callable[[LocalDataMatrix, torch.Tensor], torch.Tensor]
    step_size: float
    max_steps: int
    tol: float | None
    clamp: tuple[float, float] | None
    cap: bool
    stall_rtol: float
    model_output: str
    top_k: int | None = None
    max_memory: float | None = None


STATE_FILE = "state.json"


def _state_tensors(path: Path, meta: dict[str, Any]) -> Path:
    """The tensor file a path state's pointer names, checked: a plain name inside ``path``
    whose sha256 is the recorded one (states written before these pointers name none and
    use ``state.safetensors``)."""
    name = meta.get("tensors", "state.safetensors")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{path / STATE_FILE} names an invalid tensor file {name!r}")
    file = path / name
    if not file.is_file():
        raise ValueError(f"{path / STATE_FILE} names {name}, which is missing; delete {path} "
                         "to start over")
    digest = meta.get("sha256")
    if digest is not None and sha256_file(file) != digest:
        raise ValueError(f"{file} does not match the sha256 in {path / STATE_FILE} (a torn or "
                         f"altered state); delete {path} to start over")
    return file


class _PathState:
    """Positions, per-path bookkeeping and records of a batch of paths: everything a resumed
    call needs, saved and loaded as a whole. Bookkeeping (status, steps, lengths) lives on the
    CPU; points and probabilities stay on the model's device."""

    def __init__(self, x: torch.Tensor, rec: _Recorder) -> None:
        n = x.shape[0]
        self.x = x
        self.x_prev = x.clone()
        self.steps = torch.zeros(n, dtype=torch.long)
        self.length = torch.zeros(n, dtype=torch.float64)
        self.last_len = torch.zeros(n, dtype=torch.float64)
        self.last_probs = torch.empty(0)
        self.last_resid = torch.zeros(n, dtype=torch.float64)
        self.status = [RUNNING] * n
        self.step, self.pending = 0, False
        self.rec = rec

    _TENSORS = ("x", "x_prev", "steps", "length", "last_len", "last_probs", "last_resid")

    @classmethod
    def start(cls, model: nn.Module, x0: torch.Tensor, walk: _Walk,
              record_every: int) -> _PathState:
        st = cls(x0.detach().clone(), _Recorder(record_every))
        st.last_probs = predict_probs(model, st.x, walk.model_output)  # validates the points
        dist = walk.distance(st.x)
        if walk.tol is not None:
            st.status = [REACHED if float(d) < walk.tol else RUNNING for d in dist]
        st.record(dist)
        return st

    @classmethod
    def load(cls, path: Path, config: dict[str, Any], x0: torch.Tensor,
             record_every: int) -> _PathState | None:
        """The state saved in ``path`` (None if there is none); refused if it was saved by a
        call with other settings, or if its files do not belong together."""
        pointer = path / STATE_FILE
        if not pointer.exists():
            return None
        try:
            meta = json.loads(pointer.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{pointer} is not a valid path state ({e}); delete {path} to "
                             "start over") from None
        saved = meta.get("config") if isinstance(meta, dict) else None
        if saved != config:
            fields = differing(saved, config) if isinstance(saved, dict) else ["all"]
            raise ValueError(
                f"{path} holds the state of a different {config['kind']} path (differing: "
                f"{', '.join(fields)}); use another checkpoint directory or delete that one"
            )
        t = load_file(str(_state_tensors(path, meta)))
        st = cls(t["x"].to(x0), _Recorder(record_every))
        for name in cls._TENSORS:
            value = t[name]
            setattr(st, name, value.to(x0) if name in ("x", "x_prev", "last_probs") else value)
        st.status, st.step, st.pending = meta["status"], meta["step"], meta["pending"]
        st.rec.load(t)
        return st

    def save(self, path: Path, config: dict[str, Any]) -> None:
        """Atomic: the tensors go to a new file named by the step, then ``state.json`` — the
        one pointer, replaced atomically — names that file and its sha256; older tensor files
        are deleted only after. A kill at any point leaves a consistent state behind."""
        path.mkdir(parents=True, exist_ok=True)
        tensors = {**{k: getattr(self, k) for k in self._TENSORS}, **self.rec.state()}
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        name = f"state-{self.step:08d}-{os.urandom(4).hex()}.safetensors"  # new file each save
        write_atomic(path / name, lambda tmp: save_file(flat, str(tmp)))
        meta = {"config": config, "status": self.status, "step": self.step,
                "pending": self.pending, "tensors": name, "sha256": sha256_file(path / name)}
        write_atomic(path / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(meta)))
        for old in [*path.glob("state-*.safetensors"), path / "state.safetensors"]:
            if old.name != name:  # older steps, and the layout before these pointers
                old.unlink(missing_ok=True)

    def running(self) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(self.status) if s == RUNNING],
                            dtype=torch.long)

    def record(self, dist: torch.Tensor) -> None:
        self.rec.add(self.step, self.x, dist, self.last_probs, self.last_resid)

    def stop_nonfinite(self, rows: torch.Tensor) -> None:
        """Undo the last step of ``rows`` (it led where the model breaks) and stop them."""
        for i in rows.tolist():
            self.x[i] = self.x_prev[i]
            self.length[i] -= self.last_len[i]
            self.steps[i] = max(int(self.steps[i]) - (1 if self.last_len[i] > 0 else 0), 0)
            self.last_len[i] = 0
            self.status[i] = NONFINITE

    def refresh(self, model: nn.Module, rows: torch.Tensor, model_output: str) -> None:
        """Probabilities at the current points of ``rows`` by a forward pass alone."""
        with torch.no_grad():
            sc = to_scores(model(self.x[rows]), model_output)
        bad = (~torch.isfinite(sc).all(1)).cpu()
        self.stop_nonfinite(rows[bad])
        self.last_probs[rows[~bad]] = torch.softmax(sc[~bad], 1)

    def result(self) -> PathResult:
        rec = self.rec.state()
        return PathResult(
            points=rec["rec_points"], distances=rec["rec_dist"], probs=rec["rec_probs"],
            steps=self.steps, reached=torch.tensor([s == REACHED for s in self.status]),
            status=self.status, length=self.length, record_steps=rec["rec_steps"],
            residuals=rec["rec_resid"],
        )


def _evaluate(model: nn.Module, st: _PathState, idx: torch.Tensor, walk: _Walk):
    """G and p at the running points ``idx`` from one pass of C − 1 vector–Jacobian products
    (``top_k`` with ``walk.top_k``: G restricted to each point's most probable classes);
    points where the model's output or Jacobian is not finite are stopped (their last step
    undone). Returns ``(idx, x_a, G)`` of the points that remain (G None if none remain)."""
    xa = st.x[idx]
    classes = None
    if walk.top_k is None:
        jac_s, scores = score_jacobian(model, xa, model_output=walk.model_output,
                                       check_output=False, relative=True,
                                       max_memory=walk.max_memory)
    else:
        jac_s, classes, scores = top_k_jacobian(model, xa, walk.top_k,
                                                model_output=walk.model_output,
                                                check_output=False, max_memory=walk.max_memory)
    ok = (torch.isfinite(scores).all(1)
          & torch.isfinite(jac_s.reshape(len(idx), -1)).all(1)).cpu()
    if not ok.all():
        st.stop_nonfinite(idx[~ok])
        idx, xa, jac_s, scores = idx[ok], xa[ok], jac_s[ok], scores[ok]
        classes = None if classes is None else classes[ok.to(classes.device)]
    probs = torch.softmax(scores, dim=1)
    st.last_probs[idx] = probs
    if len(idx) == 0:
        return idx, xa, None
    if classes is not None:  # top_k_jacobian returns the rows of log p already
        return idx, xa, LocalDataMatrix(jac_s, probs, classes)
    return idx, xa, LocalDataMatrix(transform_jacobian(jac_s, scores, "log_softmax"), probs)


def _advance(st: _PathState, idx: torch.Tensor, xa: torch.Tensor, G: LocalDataMatrix,
             walk: _Walk) -> torch.Tensor:
    """One step ``x ← x + α v/‖v‖`` (``min(α, ‖v‖)`` when capped) of the running points,
    clamped to the domain if asked; sets the status of paths that stall or break. Returns the
    rows that moved."""
    v = walk.direction(G, xa, idx)
    norm = _flat_norm(v)
    tiny = torch.finfo(v.dtype).tiny
    finite = torch.isfinite(v.reshape(len(idx), -1)).all(1) & torch.isfinite(norm)
    stalled = finite & ((norm <= walk.stall_rtol * walk.reference(xa, idx)) | (norm <= tiny))
    move = finite & ~stalled
    alpha = (torch.minimum(norm, torch.full_like(norm, walk.step_size)) if walk.cap
             else walk.step_size)
    scale = torch.where(move, alpha / norm.clamp_min(tiny), 0)
    new = xa + scale.view(-1, *[1] * (st.x.ndim - 1)) * torch.nan_to_num(v)
    if walk.clamp is not None:
        new = new.clamp(*walk.clamp)
    delta = new - xa
    disp = _flat_norm(delta)
    if walk.clamp is not None:  # the clamp cancelled the step: the path cannot go on
        blocked = move & (disp <= 1e-3 * alpha)
        stalled, move = stalled | blocked, move & ~blocked
    good = (torch.isfinite(new.reshape(len(idx), -1)).all(1) & move).cpu()
    finite, stalled, move = finite.cpu(), stalled.cpu(), move.cpu()
    moved = idx[good]
    resid = (_flat_norm(walk.off(G, delta)) / disp.clamp_min(1e-300)).double().cpu()
    st.x_prev[moved] = xa[good]
    st.last_len[moved] = disp[good].double().cpu()
    st.length[moved] += st.last_len[moved]
    st.x[moved] = new[good]
    st.steps[moved] += 1
    st.last_resid[moved] = resid[good]
    for j, i in enumerate(idx.tolist()):
        if not bool(finite[j]) or (bool(move[j]) and not bool(good[j])):
            st.status[i] = NONFINITE
        elif bool(stalled[j]):
            st.status[i] = STALLED
    return moved


def _walk(model: nn.Module, x0: torch.Tensor, walk: _Walk, *, record_every: int,
          checkpoint_dir: str | os.PathLike | None, checkpoint_every: int, progress: bool,
          config: dict[str, Any]) -> PathResult:
    """The stepping loop of both path kinds.

    A point where the model's output or Jacobian is not finite is replaced by the path's
    previous point and that path stops ("nonfinite"). A path stalls when its direction ``v``
    is at most ``stall_rtol`` times the length of the vector that was projected (0: only a
    vanishing v) or when ``clamp`` cancels its step. The relative size of each step's part
    outside the distribution followed is recorded as the residual.
    """
    check_choice(walk.model_output, MODEL_OUTPUTS, "model_output")
    check_number(walk.step_size, "step_size", low=0.0, strict=True)
    check_positive_int(walk.max_steps, "the number of steps", minimum=0)
    check_number(walk.tol, "tol", low=0.0, allow_none=True)
    check_positive_int(record_every, "record_every")
    check_positive_int(checkpoint_every, "checkpoint_every", minimum=0, allow_none=True)
    if walk.clamp is not None and not (len(walk.clamp) == 2 and all(
            math.isfinite(c) for c in walk.clamp) and walk.clamp[0] < walk.clamp[1]):
        raise ValueError(f"clamp must be (lo, hi) with lo < hi, got {walk.clamp}")
    check_positive_int(walk.top_k, "top_k", allow_none=True)
    check_max_memory(walk.max_memory)
    check_independent_samples(model, x0)
    if walk.top_k is not None:
        check_top_k(walk.top_k, count_classes(model, x0))
    # one budget for the whole walk, checked before the first forward pass
    walk = replace(walk, max_memory=resolve_max_memory(walk.max_memory, x0.device))
    jacobian_chunk_size(model, x0, output="log_softmax", model_output=walk.model_output,
                        strategy="auto", relative=True, top_k=walk.top_k,
                        max_memory=walk.max_memory)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    st = _PathState.load(ckpt, config, x0, record_every) if ckpt is not None else None
    if st is None:
        st = _PathState.start(model, x0, walk, record_every)
    bar = progress_bar(enabled=progress, total=walk.max_steps, initial=st.step, desc=walk.kind,
                       unit="step", mininterval=0.5)
    try:
        while True:
            idx = st.running()
            if len(idx) and st.step >= walk.max_steps and st.pending:  # last record: forward
                st.refresh(model, idx, walk.model_output)
                idx = idx[:0]
            if len(idx):
                idx, xa, G = _evaluate(model, st, idx, walk)
            if st.pending:
                st.record(walk.distance(st.x))
                st.pending = False
            if st.step >= walk.max_steps or len(idx) == 0:
                break
            moved = _advance(st, idx, xa, G, walk)
            st.step += 1
            if walk.tol is not None:
                dist = walk.distance(st.x).cpu()
                done = [i for i in moved.tolist()
                        if st.status[i] == RUNNING and dist[i] < walk.tol]
                if done:  # evaluate the model where these paths stop (for the records)
                    for i in done:
                        st.status[i] = REACHED
                    st.refresh(model, torch.tensor(done), walk.model_output)
            st.pending = st.step % st.rec.every == 0 or st.step == walk.max_steps
            if ckpt is not None and checkpoint_every and st.step % checkpoint_every == 0:
                st.save(ckpt, config)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if st.rec.steps[-1] != st.step:
        st.record(walk.distance(st.x))
    st.status = [MAX_STEPS if s == RUNNING else s for s in st.status]
    if ckpt is not None:
        st.save(ckpt, config)
    return st.result()


def _fingerprint(model: nn.Module, checkpoint_dir: Any) -> dict[str, Any] | None:
    """The model's fingerprint where a state is kept to compare it with (else None)."""
    return model_fingerprint(model) if checkpoint_dir is not None else None


def _config(kind: str, **kw: Any) -> dict[str, Any]:
    """The settings a path state is resumed under; ``top_k`` only when set (states saved
    before it existed resume)."""
    out: dict[str, Any] = {"kind": kind}
    if kw.get("top_k", 0) is None:
        del kw["top_k"]
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            out[k] = {"shape": list(v.shape), "sha256": tensor_sha256(v)}
        else:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def horizontal_path(
    model: nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    step_size: float = 0.1,
    max_steps: int = 10000,
    tol: float = 1.0,
    model_output: ModelOutput = "logits",
    clamp: tuple[float, float] | None = None,
    record_every: int = 1,
    rtol: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    progress: bool = False,
    capped: bool = False,
    stall_rtol: float | None = None,
    top_k: int | None = None,
    max_memory: float | None = None,
) -> PathResult:
    """Grementieri & Fioresi, Algorithm 1, batched: move each source along its leaf towards
    its target.

    ``x_t = x_{t−1} + α v/‖v‖`` with ``v = P_{D_{x_{t−1}}}(target − x_{t−1})``, the projection
    through an orthonormal basis of ``D_x = (ker G)^⊥`` (never a d × d matrix), as published.
    ``capped=True`` steps ``min(α, ‖v‖)`` instead: the path then converges to the point of its
    leaf nearest the target and stops there ("stalled" once ``‖v‖ ≤ stall_rtol·‖target − x‖``,
    default ``max(1e-6, 100·eps)``), where the published fixed step keeps moving by α along
    the normalised residual direction. Uncapped paths stall only when v vanishes. A path stops
    when ``‖target − x‖ < tol``, after ``max_steps``, when NaN/Inf appears (that path only),
    or when ``target − x`` has no component in D_x left. ``clamp=(lo, hi)`` keeps points in
    the data domain. With ``checkpoint_dir``, the state is saved every ``checkpoint_every``
    steps and a later call with the same arguments resumes from it.

    :attr:`PathResult.residuals` holds, per record, ``‖P_ker v‖/‖v‖`` of the step taken
    (0 up to rounding: every step lies in D_x).

    ``top_k=K`` builds each step's G from the K most probable classes at the point (K
    backward passes instead of C − 1, :func:`~manifoldlens.information.top_k_jacobian`):
    the path then follows ``span{∇log p_c : c ∈ K}``, a subspace of D_x. ``max_memory``
    (bytes; None: half the memory available) bounds each step's G, computed in chunks of
    points (:func:`~manifoldlens.jacobian_chunk_size`); a budget too small for one point
    raises ``ValueError`` before the first step.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(4, 3).double()
    >>> src, tgt = torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    >>> res = horizontal_path(model, src, tgt, step_size=0.05, max_steps=200, tol=1e-3,
    ...                       capped=True)
    >>> res.points.shape[1:], res.status  # a linear model's leaf is a plane: target unreachable
    (torch.Size([2, 4]), ['stalled', 'stalled'])
    """
    check_batch(source, "source")
    check_batch(target, "target")
    if source.shape != target.shape:
        raise ValueError(
            f"source and target must have the same shape, got {tuple(source.shape)} and "
            f"{tuple(target.shape)}"
        )
    target = target.detach().to(source)

    def direction(G, xa, idx):
        return G.project(target[idx] - xa, rtol)

    def distance(x):
        return _flat_norm(target - x)

    config = _config("horizontal", model=_fingerprint(model, checkpoint_dir), source=source,
                     target=target, step_size=step_size, max_steps=max_steps, tol=tol,
                     clamp=clamp, record_every=record_every, model_output=model_output,
                     rtol=rtol, capped=capped, stall_rtol=stall_rtol, top_k=top_k)
    if stall_rtol is None:
        stall_rtol = max(1e-6, 100 * torch.finfo(source.dtype).eps) if capped else 0.0
    walk = _Walk("horizontal", direction, distance,
                 reference=lambda xa, idx: _flat_norm(target[idx] - xa),
                 off=lambda G, d: G.project_kernel(d, rtol), step_size=step_size,
                 max_steps=max_steps, tol=tol, clamp=clamp, cap=capped, stall_rtol=stall_rtol,
                 model_output=model_output, top_k=top_k, max_memory=max_memory)
    return _walk(model, source, walk, record_every=record_every, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=checkpoint_every, progress=progress, config=config)


def leaf_crossing_path(
    model: nn.Module,
    x: torch.Tensor,
    *,
    direction: torch.Tensor | None = None,
    steps: int = 1000,
    step_size: float = 0.1,
    seed: int = 0,
    model_output: ModelOutput = "logits",
    clamp: tuple[float, float] | None = None,
    record_every: int = 1,
    rtol: float | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    progress: bool = False,
    top_k: int | None = None,
    max_memory: float | None = None,
) -> PathResult:
    """Move across the leaves (Grementieri & Fioresi, §4.2): ``x_t = x_{t−1} + α v/‖v‖``
    with ``v = P_{ker G(x_{t−1})} r`` for a fixed direction r (random normal from ``seed``
    unless given; one per point). The prediction is constant to second order along the way
    (``vᵀGv = 0``); :attr:`PathResult.distances` is the distance from the start.

    :attr:`PathResult.residuals` holds ``‖P_D v‖/‖v‖`` of the step taken (0 up to rounding).
    ``top_k=K``: G from the K most probable classes at each point, so v is orthogonal to their
    K gradients only (the kernel of the restricted G, larger than ker G). ``max_memory`` as
    in :func:`horizontal_path`.
    """
    check_batch(x, "x")
    if direction is None:
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    else:
        r = direction.detach().to(x)
        if r.shape != x.shape:
            r = r.expand_as(x).clone()
    start = x.detach().clone()

    def direction_fn(G, xa, idx):
        return G.project_kernel(r[idx], rtol)

    def distance(z):
        return _flat_norm(z - start)

    config = _config("leaf_crossing", model=_fingerprint(model, checkpoint_dir), x=x, direction=r,
                     steps=steps, step_size=step_size, clamp=clamp, record_every=record_every,
                     model_output=model_output, rtol=rtol, top_k=top_k)
    walk = _Walk("across", direction_fn, distance, reference=lambda xa, idx: _flat_norm(r[idx]),
                 off=lambda G, d: G.project(d, rtol), step_size=step_size, max_steps=steps,
                 tol=None, clamp=clamp, cap=False, stall_rtol=0.0, model_output=model_output,
                 top_k=top_k, max_memory=max_memory)
    return _walk(model, x, walk, record_every=record_every, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=checkpoint_every, progress=progress, config=config)


@dataclass
class InvolutivityResult:
    """Relative Lie-bracket residuals outside D_x, per point and class pair."""

    residual: torch.Tensor  #: (n, P) ‖P_ker [X_i, X_j]‖ / ‖[X_i, X_j]‖
    bracket_norm: torch.Tensor  #: (n, P) ‖[X_i, X_j]‖
    pairs: list[tuple[int, int]]

    @property
    def max(self) -> torch.Tensor:
        """Largest residual per point (n,) over pairs with a non-negligible bracket."""
        r = torch.where(torch.isfinite(self.residual), self.residual, 0)
        return r.max(dim=1).values


def involutivity_residual(
    model: nn.Module,
    x: torch.Tensor,
    *,
    pairs: list[tuple[int, int]] | None = None,
    model_output: ModelOutput = "logits",
    rtol: float | None = None,
) -> InvolutivityResult:
    """Numerical Frobenius check: is ``x ↦ D_x`` involutive (Grementieri & Fioresi, §3, App. B)?

    For the fields ``X_i = ∇_x log p_i`` the bracket ``[X_i, X_j] = H_j X_i − H_i X_j`` (H_i the
    Hessian of log p_i, by Hessian-vector products) must lie in ``D_x = span{X_c}`` for the
    distribution to be integrable. Returns ``‖P_{ker G}[X_i, X_j]‖ / ‖[X_i, X_j]‖`` per point and
    pair (NaN where the bracket vanishes). Theorem 3.1: ≈ 0 for ReLU networks (piecewise
    linear: H_i = −G on each linear region); in general not for smooth activations.
    """
    check_choice(model_output, MODEL_OUTPUTS, "model_output")
    check_batch(x)
    check_independent_samples(model, x)
    G = local_data_matrix(model, x, model_output=model_output)
    c = G.num_classes
    if pairs is None:
        pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    for i, j in pairs:
        if not (0 <= i < c and 0 <= j < c) or i == j:
            raise ValueError(f"pairs must hold distinct class indices in [0, {c}), got {(i, j)}")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        logp = torch.log_softmax(to_scores(model(xr), model_output), dim=1)
        fields = {}
        for k in sorted({k for p in pairs for k in p}):
            (fields[k],) = torch.autograd.grad(logp[:, k].sum(), xr, create_graph=True)

        def hvp(k: int, v: torch.Tensor) -> torch.Tensor:
            (h,) = torch.autograd.grad((fields[k] * v).sum(), xr, retain_graph=True,
                                       allow_unused=True)
            return torch.zeros_like(xr) if h is None else h

        res, norms = [], []
        for i, j in pairs:
            xi, xj = fields[i].detach(), fields[j].detach()
            hi, hj = hvp(j, xi), hvp(i, xj)
            bracket = hi - hj
            bn = _flat_norm(bracket)
            out = _flat_norm(G.project_kernel(bracket.detach(), rtol))
            # cancellation below rounding of the two terms: the bracket is numerically 0
            scale = _flat_norm(hi) + _flat_norm(hj)
            tiny = bn <= 1e3 * torch.finfo(x.dtype).eps * scale.clamp_min(1e-300)
            res.append(torch.where(tiny, torch.full_like(bn, float("nan")), out / bn))
            norms.append(bn)
    return InvolutivityResult(torch.stack(res, 1).detach(), torch.stack(norms, 1).detach(),
                              list(pairs))
