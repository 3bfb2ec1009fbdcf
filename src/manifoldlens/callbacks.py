"""Analyses that follow a model while it trains: hooks into :func:`~manifoldlens.training.fit`.

:class:`TraceOfG` follows the trace (soft rank) and rank of the local data matrix on a probe
batch, as Grementieri & Fioresi do in their Figure 2; :class:`TangentFractionDuringTraining`
follows the fraction of the model's gradient in the data's tangent space, as Bordt et al. do
in their Figure 6. The records go to the run's ``metrics.jsonl``; commands draw them
(:func:`manifoldlens.viz.plot_trace_of_g`, :func:`manifoldlens.viz.plot_fraction_over_training`).

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289. §4.1, Figure 2.

S. Bordt, U. Upadhyay, Z. Akata, U. von Luxburg. "The Manifold Hypothesis for Gradient-Based
Explanations." CVPR Workshops 2023. arXiv:2206.07387. §4.5, Figure 6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ._utils import eval_mode, tensor_sha256
from .attribution import explain
from .information import default_rtol, local_data_matrix
from .runs import read_records
from .training import Callback, TrainState

__all__ = ["Periodic", "TangentFractionDuringTraining", "TraceOfG", "read_trace_records"]


class Periodic(Callback):
    """A measurement taken at step 0 and every ``every`` steps, kept in ``records``."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.records: list[dict[str, float]] = []

    def measure(self, state: TrainState) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def on_train_start(self, state: TrainState) -> None:
        done = {r["step"] for r in self.records}
        if state.step % self.every == 0 and state.step not in done:
            self.measure(state)

    def on_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.measure(state)

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))


class TraceOfG(Periodic):
    """Mean trace and numerical rank of G(x, w) on a fixed probe batch during training.

    Grementieri & Fioresi, Figure 2: the mean trace (the soft rank, eq. 11) and its
    exponential moving average ``ema_t = β ema_{t−1} + (1 − β) trace_t``. Records go to
    ``metrics.jsonl`` under ``"trace_of_g"`` and, at the end of training, all of them to
    ``trace_of_g.json``; :func:`manifoldlens.viz.plot_trace_of_g` draws them.

    Parameters
    ----------
    probe : Tensor (n, *shape)
        The fixed batch (Grementieri & Fioresi use one batch of images).
    every : int
        Steps between measurements (also at step 0, before training).
    beta : float
        Smoothing of the moving average.
    rtol : float, optional
        Relative eigenvalue tolerance for the numerical rank.
    """

    def __init__(
        self, probe: torch.Tensor, every: int = 100, beta: float = 0.9, rtol: float | None = None
    ) -> None:
        super().__init__(every)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.probe = probe
        self.beta = beta
        self.rtol = rtol

    def config(self) -> dict[str, Any]:
        return {"every": self.every, "beta": self.beta, "rtol": self.rtol,
                "probe": {"shape": list(self.probe.shape), "sha256": tensor_sha256(self.probe)}}

    def measure(self, state: TrainState) -> dict[str, float]:
        model = state.model
        with eval_mode(model):
            device = next(model.parameters()).device
            G = local_data_matrix(model, self.probe.to(device), model_output=state.model_output)
        trace = G.trace
        c = G.num_classes
        rtol = self.rtol if self.rtol is not None else default_rtol(c, G.eigenvalues.dtype)
        rank = G.rank(rtol).double()
        mean = float(trace.mean())
        prev = self.records[-1]["ema_trace"] if self.records else mean
        rec = {
            "step": state.step,
            "mean_trace": mean,
            "median_trace": float(trace.median()),
            "ema_trace": self.beta * prev + (1 - self.beta) * mean,
            "mean_rank": float(rank.mean()),
            "full_rank_fraction": float((rank == c - 1).double().mean()),
        }
        self.records.append(rec)
        if state.run is not None:
            state.run.log(trace_of_g=rec)
        return rec

    def on_train_end(self, state: TrainState) -> None:
        if state.run is not None and self.records:
            state.run.save_json("trace_of_g", self.records)


class TangentFractionDuringTraining(Periodic):
    """Bordt et al., Figure 6: the fraction of the model's gradient (or another attribution) in
    the data's tangent space, on a fixed probe batch, over the course of training.

    Records mean, median and the 5 %/95 % quantiles of ``tangent.fraction(explain(...))``
    under ``key`` (default ``"tangent_fraction"``; one key per callback when several follow
    different probes) in ``metrics.jsonl``; ``tangent`` is a
    :class:`~manifoldlens.tangent.TangentSpace` of the probe points.
    """

    def __init__(self, probe: torch.Tensor, tangent: Any, every: int = 100,
                 method: str = "gradient", targets: torch.Tensor | None = None,
                 key: str = "tangent_fraction") -> None:
        super().__init__(every)
        self.probe, self.tangent, self.method, self.targets = probe, tangent, method, targets
        self.key = key

    def config(self) -> dict[str, Any]:
        basis = getattr(self.tangent, "basis", None)
        return {"every": self.every, "method": self.method,
                "probe_sha256": tensor_sha256(self.probe, self.targets),
                "tangent_sha256": tensor_sha256(basis) if basis is not None else None}

    def measure(self, state: TrainState) -> dict[str, float]:
        model = state.model
        with eval_mode(model):
            device = next(model.parameters()).device
            a = explain(model, self.probe.to(device), self.method, self.targets,
                        model_output=state.model_output)
        f = self.tangent.fraction(a.to(self.tangent.basis)).double().cpu()
        q = torch.quantile(f, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
        rec = {"step": state.step, "mean": float(f.mean()), "median": float(q[1]),
               "q05": float(q[0]), "q95": float(q[2])}
        self.records.append(rec)
        if state.run is not None:
            state.run.log(**{self.key: rec})
        return rec


def read_trace_records(path: str | Path) -> list[dict[str, float]]:
    """The :class:`TraceOfG` records of a run directory (from ``metrics.jsonl``)."""
    rows = [r for _, r in read_records(Path(path) / "metrics.jsonl")]
    return [r["trace_of_g"] for r in rows if "trace_of_g" in r]
