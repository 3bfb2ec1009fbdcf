"""Classifier architectures, a JSON spec registry, and pickle-free checkpoints.

Every model returns logits ``(n, num_classes)`` (``Seed001CNN(log_softmax=True)`` returns
log-probabilities instead) and stores ``model.spec``, a JSON-serialisable dict from which
:func:`build_model` rebuilds the same architecture. Inputs are batched on the first axis:
``(n, *in_shape)`` or any ``(n, ...)`` with the same number of features per sample.

Checkpoints are a ``<stem>.safetensors`` file (weights, no pickle) plus a ``<stem>.json``
manifest (spec, user metadata, sha256 of the weights, torch version), and optionally
``<stem>.optim.pt`` holding an optimizer state dict, read back with ``weights_only=True``.

>>> m = create_model("mlp", (2,), 3, hidden=(4,))
>>> m(torch.zeros(5, 2)).shape
torch.Size([5, 3])
>>> build_model(m.spec).spec == m.spec
True

References
----------
L. Grementieri, R. Fioresi. "Model-centric Data Manifold: the Data Through the Eyes of the
Model." SIAM Journal on Imaging Sciences 15(3), 2022. arXiv:2104.13289.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ._utils import (
    BuildTooLarge,
    build_budget,
    first_nonfinite,
    json_text,
    safetensors_header,
    sha256_file,
)

__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "MLP",
    "Linear",
    "Seed001CNN",
    "SmallCNN",
    "build_model",
    "checkpoint_metadata",
    "checkpoint_sha256",
    "register_architecture",
    "count_parameters",
    "create_model",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
}

#: Architecture name (the ``"arch"`` of a model's spec) → class; filled by
#: :func:`register_architecture` where each class is defined.
ARCHITECTURES: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound=type[nn.Module])


def register_architecture(name: str) -> Callable[[_M], _M]:
    """Class decorator: models of this class can be built from their spec by name
    (:func:`create_model`, :func:`build_model`, :func:`load_checkpoint`).

    The class stores ``self.spec = {"arch": name, **constructor arguments}``. A name taken by
    another class raises ``ValueError``.
    """

    def register(cls: _M) -> _M:
        known = ARCHITECTURES.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"architecture {name!r} is registered already, by "
                             f"{known.__module__}.{known.__qualname__}")
        ARCHITECTURES[name] = cls
        return cls

    return register


_FORMAT = "manifoldlens.checkpoint"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- helpers


def _make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (ValueError listing the choices)."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _int_tuple(values: Any, name: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}")
    out = tuple(positive_int(v, f"{name} entry") for v in values)
    if not out and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return out


def image_shape(in_shape: Any, min_hw: int, arch: str) -> tuple[int, int, int]:
    shape = _int_tuple(in_shape, "in_shape")
    if len(shape) != 3:
        raise ValueError(f"{arch} needs in_shape (C, H, W), got {shape}")
    if shape[1] < min_hw or shape[2] < min_hw:
        raise ValueError(f"{arch} needs H, W >= {min_hw}, got in_shape {shape}")
    return shape  # type: ignore[return-value]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def as_batch(x: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Reshape ``x`` of shape ``(n, ...)`` to ``(n, *in_shape)``, with a clear error."""
    if x.ndim < 1:
        raise ValueError("input must be batched on the first axis, got a 0-d tensor")
    if tuple(x.shape[1:]) == in_shape:
        return x
    if _numel(x.shape[1:]) != _numel(in_shape):
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not match in_shape {in_shape}: "
            f"expected (n, *{in_shape}) or (n, ...) with {_numel(in_shape)} features per sample"
        )
    return x.reshape(x.shape[0], *in_shape)


def make_spec(arch: str, **kwargs: Any) -> dict[str, Any]:
    """A JSON-ready spec: tuples become lists."""
    spec: dict[str, Any] = {"arch": arch}
    for key, value in kwargs.items():
        spec[key] = list(value) if isinstance(value, tuple) else value
    return spec


# ----------------------------------------------------------------------------- models


@register_architecture("seed001_cnn")
class Seed001CNN(nn.Module):
    """The PyTorch MNIST-example CNN used by Grementieri & Fioresi.

    conv(C_in→32, 3×3) → ReLU → conv(32→64, 3×3) → ReLU → max-pool 2 → flatten →
    fc(→128) → ReLU → fc(128→num_classes) [→ LogSoftmax(dim=1) if ``log_softmax``].

    The two dropout layers of the example are omitted: they act only in train mode and
    would make input Jacobians random there. Parameter names (``conv1``, ``conv2``, ``fc1``,
    ``fc2``) match the example, so its state dicts load with ``strict=True``.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        log_softmax: bool = False,
    ) -> None:
        super().__init__()
        c, h, w = image_shape(in_shape, 6, "Seed001CNN")
        self.in_shape: tuple[int, ...] = (c, h, w)
        self.num_classes = positive_int(num_classes, "num_classes")
        self.conv1 = nn.Conv2d(c, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.fc_in = 64 * ((h - 4) // 2) * ((w - 4) // 2)
        self.fc1 = nn.Linear(self.fc_in, 128)
        self.fc2 = nn.Linear(128, self.num_classes)
        self.log_softmax = nn.LogSoftmax(dim=1) if log_softmax else None
        self.spec = make_spec(
            "seed001_cnn",
            in_shape=self.in_shape,
            num_classes=self.num_classes,
            log_softmax=bool(log_softmax),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_batch(x, self.in_shape)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return self.log_softmax(x) if self.log_softmax is not None else x


@register_architecture("mlp")
class MLP(nn.Module):
    """Fully connected classifier: flatten → [Linear → act] per hidden width → Linear."""

    def __init__(
        self,
        in_shape: Sequence[int] | int,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 128),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _make_activation(activation)
        self.in_shape = _int_tuple(in_shape, "in_shape")
        self.num_classes = positive_int(num_classes, "num_classes")
        hidden = _int_tuple(hidden, "hidden", allow_empty=True)
        layers: list[nn.Module] = [nn.Flatten(1)]
        width = _numel(self.in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), _make_activation(activation)]
            width = h
        layers.append(nn.Linear(width, self.num_classes))
        self.net = nn.Sequential(*layers)
        self.spec = make_spec(
            "mlp",
            in_shape=self.in_shape,
            num_classes=self.num_classes,
            hidden=hidden,
            activation=activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(as_batch(x, self.in_shape))


@register_architecture("small_cnn")
class SmallCNN(nn.Module):
    """Small CNN for tiny images (e.g. 8×8 digits); works for any H, W >= 2.

    [conv3×3 pad 1 → act] per entry of ``channels`` → max-pool 2 → flatten →
    fc(→hidden) → act → fc(hidden→num_classes).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _make_activation(activation)
        c, h, w = image_shape(in_shape, 2, "SmallCNN")
        self.in_shape: tuple[int, ...] = (c, h, w)
        self.num_classes = positive_int(num_classes, "num_classes")
        channels = _int_tuple(channels, "channels")
        hidden = positive_int(hidden, "hidden")
        feats: list[nn.Module] = []
        prev = c
        for ch in channels:
            feats += [nn.Conv2d(prev, ch, 3, padding=1), _make_activation(activation)]
            prev = ch
        feats.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*feats)
        self.fc_in = prev * (h // 2) * (w // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(self.fc_in, hidden),
            _make_activation(activation),
            nn.Linear(hidden, self.num_classes),
        )
        self.spec = make_spec(
            "small_cnn",
            in_shape=self.in_shape,
            num_classes=self.num_classes,
            channels=channels,
            hidden=hidden,
            activation=activation,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(as_batch(x, self.in_shape)))


@register_architecture("linear")
class Linear(nn.Module):
    """Linear softmax model: flatten → ``nn.Linear`` (logits ``W x + b``).

    ``weight`` (num_classes, D) and ``bias`` give the closed form used as a test reference.
    """

    def __init__(self, in_shape: Sequence[int] | int, num_classes: int = 10) -> None:
        super().__init__()
        self.in_shape = _int_tuple(in_shape, "in_shape")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.fc = nn.Linear(_numel(self.in_shape), self.num_classes)
        self.spec = make_spec("linear", in_shape=self.in_shape, num_classes=self.num_classes)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.fc.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_batch(x, self.in_shape)
        return self.fc(x.reshape(x.shape[0], -1))


# ----------------------------------------------------------------------------- registry

def _arch_class(arch: Any) -> type[nn.Module]:
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def create_model(
    arch: str, in_shape: Sequence[int] | int, num_classes: int, **kwargs: Any
) -> nn.Module:
    """Instantiate architecture ``arch`` (a key of :data:`ARCHITECTURES`)."""
    return build_model({"arch": arch, "in_shape": in_shape, "num_classes": num_classes, **kwargs})


def _upgraded_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` with the keys that older versions of its class did not write filled
    in by the class's ``upgrade_spec`` (if it has one)."""
    cls = _arch_class(spec["arch"])
    return cls.upgrade_spec(dict(spec)) if hasattr(cls, "upgrade_spec") else dict(spec)


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a freshly initialised model from ``spec`` (as stored in ``model.spec``)."""
    if not isinstance(spec, Mapping) or "arch" not in spec:
        raise ValueError(f"spec must be a dict with an 'arch' key, got {spec!r}")
    cls = _arch_class(spec["arch"])
    spec = _upgraded_spec(spec)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "arch"}
    allowed = set(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"spec for {spec['arch']!r} has unknown keys {unknown}; allowed: {sorted(allowed)}"
        )
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- checkpoints

_SUFFIXES = (".json", ".safetensors", ".optim.pt")


def _stem(path: str | os.PathLike[str]) -> str:
    """Strip one known checkpoint suffix (string-wise: ``run.5`` stays ``run.5``)."""
    s = os.fspath(path)
    for suffix in _SUFFIXES:
        if s.endswith(suffix):
            return s[: -len(suffix)]
    return s


def save_checkpoint(
    path_stem_or_dir: str | os.PathLike[str],
    model: nn.Module,
    *,
    metadata: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Save ``model`` and return the ``.json`` manifest path.

    Writes ``<stem>.safetensors`` (weights), ``<stem>.json`` (spec, ``metadata``, sha256,
    torch version) and, with ``optimizer``, ``<stem>.optim.pt``. An existing directory
    as ``path_stem_or_dir`` means stem ``<dir>/checkpoint``; a trailing ``.json`` or
    ``.safetensors`` is stripped. Suffixes are appended to the string, so ``run.5`` is kept.
    Any ``nn.Module`` can be saved; one without a manifoldlens ``spec`` is stored with
    ``"spec": null`` and read back into a model you build with :func:`load_weights`.
    The manifest is standard JSON (:func:`manifoldlens._utils.jsonable`): a NaN in
    ``metadata`` is written as ``null``, an infinity as ``"inf"`` / ``"-inf"``.
    """
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or "arch" not in spec:
        spec = None
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")

    p = Path(path_stem_or_dir)
    stem = str(p / "checkpoint") if p.is_dir() else _stem(path_stem_or_dir)
    weights = Path(stem + ".safetensors")
    manifest_path = Path(stem + ".json")
    optim_path = Path(stem + ".optim.pt")
    weights.parent.mkdir(parents=True, exist_ok=True)

    manifest: dict[str, Any] = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "spec": spec,
        "metadata": dict(metadata or {}),
        "weights": weights.name,
        "sha256": None,
        "optimizer": None,
        "optimizer_sha256": None,
        "torch_version": torch.__version__,
    }
    json_text(manifest)  # fail before writing anything

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = Path(str(weights) + ".tmp")
    arch = str(spec["arch"]) if spec else type(model).__name__
    save_file(tensors, str(tmp), metadata={"format": _FORMAT, "arch": arch,  # the spec also
                                           "spec": json_text(spec)})  # travels with weights
    os.replace(tmp, weights)
    manifest["sha256"] = sha256_file(weights)

    if optimizer is not None:
        tmp = Path(str(optim_path) + ".tmp")
        torch.save(optimizer.state_dict(), tmp)
        os.replace(tmp, optim_path)
        manifest["optimizer"] = optim_path.name
        manifest["optimizer_sha256"] = sha256_file(optim_path)

    tmp = Path(str(manifest_path) + ".tmp")
    tmp.write_text(json_text(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest_path


def _checked_file(directory: Path, name: Any, digest: Any, what: str) -> Path:
    if not isinstance(name, str) or not name:
        raise ValueError(f"checkpoint manifest in {directory} names no {what} file")
    if Path(name).name != name or name in (".", ".."):
        raise ValueError(f"checkpoint manifest in {directory} names the {what} file {name!r} "
                         "outside its directory; a manifest names files beside it only")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {what} file not found: {path}")
    if digest is not None and sha256_file(path) != digest:
        raise ValueError(
            f"sha256 mismatch for {path}: the file was modified or corrupted after saving"
        )
    return path


def _rebind(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Point ``optimizer`` at ``model``'s parameters, matched in ``model.parameters()`` order."""
    new = list(model.parameters())
    old = [p for group in optimizer.param_groups for p in group["params"]]
    if [p.shape for p in old] != [p.shape for p in new]:
        raise ValueError(
            f"optimizer holds {len(old)} parameters whose shapes do not match the "
            f"{len(new)} parameters of the checkpoint's model (in model.parameters() order); "
            "create it over build_model(spec).parameters()"
        )
    it = iter(new)
    for group in optimizer.param_groups:
        group["params"] = [next(it) for _ in group["params"]]
    optimizer.state.clear()


def _read_manifest(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The manifest of ``path``: a directory means ``<dir>/checkpoint.json`` (where
    :func:`save_checkpoint` puts it), anything else ``<stem>.json``."""
    manifest_path = Path(path) / "checkpoint.json" if Path(path).is_dir() else \
        Path(_stem(path) + ".json")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"checkpoint manifest not found: {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"{manifest_path} is not a manifoldlens checkpoint manifest")
    if manifest.get("sha256") is None:
        raise ValueError(f"{manifest_path} records no sha256 for its weights")
    if not all(isinstance(manifest.get(k) or {}, dict) for k in ("spec", "metadata")):
        raise ValueError(f"{manifest_path}: its spec and metadata must be JSON objects")
    return manifest_path, manifest


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a checkpoint's manifest (which names its files and their sha256)."""
    return sha256_file(_read_manifest(path)[0])


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a checkpoint, read from its manifest alone (no weights loaded)."""
    _, manifest = _read_manifest(path)
    return dict(manifest.get("metadata") or {})


def load_weights(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint's weights (and optimizer state) into an existing ``model``.

    Works for any ``nn.Module``: the sha256 of the weights is verified, the state dict is
    loaded with ``strict=True`` and the optimizer state (over ``model``'s parameters) is read
    with ``weights_only=True``. Weights holding NaN or Inf are refused with a ValueError
    naming the file and the first such tensor, unless ``allow_nonfinite``. ``path`` may be a
    directory written by :func:`save_checkpoint`. Returns the checkpoint's metadata.
    """
    manifest_path, manifest = _read_manifest(path)
    weights = _checked_file(manifest_path.parent, manifest.get("weights"), manifest["sha256"],
                            "weights")
    return _load_state(manifest_path, manifest, weights, model, optimizer=optimizer,
                       map_location=map_location, allow_nonfinite=allow_nonfinite)


def _load_state(manifest_path: Path, manifest: dict[str, Any], weights: Path, model: nn.Module,
                *, optimizer: torch.optim.Optimizer | None,
                map_location: str | torch.device | None, allow_nonfinite: bool
                ) -> dict[str, Any]:
    """The body of :func:`load_weights`, the weights file verified already."""
    if map_location is None:
        map_location = next(iter(model.parameters()), torch.empty(0)).device
    state = load_file(str(weights), device="cpu")
    params = {k for k, _ in model.named_parameters()}  # buffers may hold -inf (masks)
    bad = None if allow_nonfinite else first_nonfinite({k: state[k] for k in params if k in state})
    if bad is not None:
        name, count, numel = bad
        raise ValueError(f"{weights}: tensor {name!r} holds {count} NaN/Inf values (of {numel}); "
                         "pass allow_nonfinite=True to load it anyway")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {manifest_path} do not fit this model "
                         f"({type(model).__name__}): {e}") from None
    if optimizer is not None:
        if manifest.get("optimizer") is None:
            raise ValueError(f"checkpoint {manifest_path} holds no optimizer state")
        optim_path = _checked_file(manifest_path.parent, manifest["optimizer"],
                                   manifest.get("optimizer_sha256"), "optimizer")
        optimizer.load_state_dict(
            torch.load(optim_path, map_location=map_location, weights_only=True)
        )
    return dict(manifest.get("metadata") or {})


def model_for_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """The model to load the checkpoint ``path`` into when continuing a run with ``model``.

    ``model`` itself, unless the checkpoint was written by an older layout of the same
    architecture (its spec lacks a key that the class's ``upgrade_spec`` fills in): then a
    model rebuilt from the upgraded spec. Any other difference of spec is an error naming
    the keys.
    """
    _, manifest = _read_manifest(path)
    stored, spec = manifest.get("spec"), getattr(model, "spec", None)
    if stored is None or spec is None:
        return model
    upgraded = _upgraded_spec(stored)
    filled = set(upgraded) - set(stored)
    changed = sorted(k for k in set(spec) | set(upgraded)
                     if k not in filled and spec.get(k) != upgraded.get(k))
    if changed:
        diff = ", ".join(f"{k}: {upgraded.get(k)!r} there, {spec.get(k)!r} now" for k in changed)
        raise ValueError(f"cannot continue from {path}: it holds a model with other settings "
                         f"({diff})")
    if all(spec.get(k) == upgraded[k] for k in filled):
        return model
    return build_model(upgraded).to(next(iter(model.parameters()), torch.empty(0)))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    allow_nonfinite: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint from its ``.json``, ``.safetensors`` or stem path, or the directory
    :func:`save_checkpoint` wrote it into. Returns ``(model in eval mode, metadata dict)``.

    Verifies the sha256 of the weights; checks the stored spec against the names and shapes
    in the safetensors header on the ``meta`` device, within a budget (:func:`_build_for`),
    so a spec that does not fit is refused naming the file before real memory is spent;
    builds the model, casts each floating tensor to its stored dtype (mixed float32 / float64
    checkpoints keep both), loads the weights with ``strict=True`` (NaN/Inf refused unless
    ``allow_nonfinite``) and moves the model to ``map_location``. With ``optimizer`` (over a
    model of the same spec), its parameters are rebound to the returned model's, in
    ``model.parameters()`` order, and its state is restored from ``<stem>.optim.pt``.
    """
    manifest_path, manifest = _read_manifest(path)
    if manifest.get("spec") is None:
        raise ValueError(
            f"{manifest_path} holds the weights of a custom model (no architecture spec): "
            "build the model yourself and call load_weights(path, model)"
        )
    weights = _checked_file(
        manifest_path.parent, manifest.get("weights"), manifest["sha256"], "weights"
    )
    header, stored = safetensors_header(weights)
    saved = stored.get("spec")  # saved with the weights: an edited manifest is not trusted
    if saved is not None and saved != json_text(manifest["spec"]):
        raise ValueError(f"{manifest_path}: its spec differs from the one saved with the "
                         f"weights in {weights} (was the manifest edited?)")
    model = _build_for(manifest["spec"], header, manifest_path, weights)
    floating = {dt for dt, _ in header.values() if dt.is_floating_point}
    if len(floating) == 1:  # derived buffers (masks) follow too
        model = model.to(floating.pop())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        stored = header.get(name, (None, None))[0]
        if stored is not None and stored.is_floating_point and t.is_floating_point():
            t.data = t.data.to(stored)
    if optimizer is not None:
        _rebind(optimizer, model)
    metadata = _load_state(manifest_path, manifest, weights, model, optimizer=optimizer,
                           map_location=map_location, allow_nonfinite=allow_nonfinite)
    return model.to(map_location).eval(), metadata


def _build_for(spec: Any, header: dict[str, tuple[torch.dtype, tuple[int, ...]]],
               manifest_path: Path, weights: Path) -> nn.Module:
    """``build_model(spec)`` once the spec is known to describe the tensors of ``header``.

    The model is first built on the ``meta`` device, within a budget: a model that fits the
    file registers each of its n stored tensors (N elements) once, plus parameterless
    modules (activations, reshapes) and buffers derived from the same sizes (masks); so
    building may register at most 8·n + 256 tensors and as many submodules, holding at most
    2·N + 2**20 elements, and is stopped the moment it exceeds that (a spec asking for
    10**7 couplings stops after a few hundred). A class whose constructor cannot run on
    ``meta`` is built on the CPU within the same budget. Its state dict is then loaded from
    meta-device stand-ins of the header's tensors (so load hooks apply as they will), and any
    missing, unexpected or misshapen tensor is a ValueError naming the file.
    """
    n = len(header)
    total = sum(_numel(shape) for _, shape in header.values())
    budget = {"tensors": 8 * n + 256, "modules": 8 * n + 256, "elements": 2 * total + 2**20}
    device = "meta"
    try:
        try:
            with build_budget(**budget), torch.device(device):
                probe = build_model(spec)
        except (NotImplementedError, RuntimeError) as e:
            if "meta" not in str(e) and not isinstance(e, NotImplementedError):
                raise
            device = "cpu"  # a registered class whose constructor needs real tensors
            with build_budget(**budget):
                probe = build_model(spec)
    except BuildTooLarge as e:
        raise ValueError(f"{manifest_path}: its spec describes a model far larger than the "
                         f"{n} tensors ({total} elements) in {weights} ({e} while building "
                         f"it on the {device} device); the manifest does not fit these weights"
                         ) from None
    except (ValueError, TypeError, RuntimeError, OverflowError, KeyError) as e:
        raise ValueError(f"{manifest_path}: cannot build the model of its spec: {e}") from None
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    wrong = [k for k, s in expected.items() if k in header and header[k][1] != s]
    problems = [f"{len(wrong)} tensors of other shapes (" + "; ".join(
        f"{k}: {header[k][1]} in the file, {expected[k]} in the model" for k in wrong[:3])
        + ("; ..." if len(wrong) > 3 else "") + ")"] if wrong else []
    if device == "meta":  # (a CPU-built model meets the real weights later)
        stand_ins = {k: torch.empty(s, dtype=dt, device="meta")
                     for k, (dt, s) in header.items() if k not in wrong}
        try:
            result = probe.load_state_dict(stand_ins, strict=False, assign=True)
        except RuntimeError as e:
            problems.append(str(e)[:1000])
        else:
            for keys, what in ((result.missing_keys, "missing from the file"),
                               (result.unexpected_keys, "not in the model")):
                keys = [k for k in keys if k not in wrong]
                if keys:
                    problems.append(f"{len(keys)} tensors {what} ({', '.join(keys[:3])}"
                                    f"{', ...' if len(keys) > 3 else ''})")
    if problems:
        raise ValueError(f"{weights} does not fit the {spec.get('arch')!r} model that "
                         f"{manifest_path.name} describes: {'; '.join(problems)}")
    return build_model(spec) if device == "meta" else probe
