"""Hostile and damaged files: every bad input is a clear error naming the file, nothing computed
is lost, and what a file declares cannot make us spend unbounded memory or time.

IDX gzip bombs and forged headers, labels far outside the class list, checkpoint specs that do
not fit their weights, NaN weights, mixed dtypes, torn ``metrics.jsonl`` lines, NaN metadata,
a stale IDX cache. Byte-level corruption is drawn by hypothesis.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
import tempfile
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from manifoldlens.data import clear_cache, load_dataset
from manifoldlens.flows.models import NICE, Glow, RealNVP
from manifoldlens.generative import VAE, AutoEncoder, BetaTCVAE
from manifoldlens.idx import read_idx, read_idx_shared, write_idx
from manifoldlens.models import (
    MLP,
    Linear,
    Seed001CNN,
    SmallCNN,
    checkpoint_metadata,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from manifoldlens.runs import Run

MiB = 1 << 20


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """One-time imports outside the timed tests: what a Run records (sklearn, matplotlib), and
    torch._dynamo, which torch imports the first time ``arange`` runs on the meta device."""
    import matplotlib  # noqa: F401
    import sklearn  # noqa: F401

    with torch.device("meta"):
        torch.arange(4) % 2
FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _peak(fn, *args, **kwargs):
    """``(result or exception, peak traced bytes, seconds)`` of ``fn(*args, **kwargs)``."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - returned to the test
        out = e
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, peak, seconds


# ---------------------------------------------------------------------------------------------
# 1. IDX: gzip bombs, forged sizes, byte-level corruption
# ---------------------------------------------------------------------------------------------


def _gzip_bomb(path: Path, head: bytes, zeros_mib: int) -> Path:
    """A gzip file decompressing to ``head`` followed by ``zeros_mib`` MiB of zeros, built in
    milliseconds: one deflate block of 1 MiB of zeros, byte-aligned by a full flush (so it
    is self-contained), repeated. Its trailer's CRC is not that of the content: a reader
    that stops where it should never gets there."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    body = first + zeros * zeros_mib + b"\x03\x00"  # an empty final block
    size = (len(head) + zeros_mib * MiB) & 0xFFFFFFFF
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body
                     + struct.pack("<II", 0, size))
    return path


def _idx_header(code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def test_gzip_bomb_behind_a_tiny_header_is_refused_in_bounded_memory(tmp_path):
    # 1 MiB of gzip: a header declaring 10 bytes, then 1 GiB of zeros
    bomb = _gzip_bomb(tmp_path / "train-labels-idx1-ubyte.gz",
                      _idx_header(0x08, (10,)) + bytes(range(10)), 1024)
    assert bomb.stat().st_size < 1.1 * MiB
    err, peak, seconds = _peak(read_idx, bomb)
    assert isinstance(err, ValueError) and str(bomb) in str(err), err
    assert "trailing bytes" in str(err) and "not decompressed" in str(err)
    assert peak < 8 * MiB and seconds < 1.0, (peak, seconds)


def test_gzip_header_declaring_more_than_the_file_can_hold(tmp_path):
    # 10**8 bytes declared by a gzip file of ~60 bytes: deflate cannot expand 1000000:1
    forged = tmp_path / "forged.gz"
    forged.write_bytes(gzip.compress(_idx_header(0x08, (1000, 1000, 100)) + bytes(16)))
    err, peak, _ = _peak(read_idx, forged)
    assert isinstance(err, ValueError) and str(forged) in str(err)
    assert "can hold" in str(err) and "100000000 bytes" in str(err)
    assert peak < MiB
    # a plain file: its size must be header + payload, checked before anything is allocated
    plain = tmp_path / "forged"
    plain.write_bytes(_idx_header(0x08, (1000, 1000, 100)) + bytes(16))
    err, peak, _ = _peak(read_idx, plain)
    assert isinstance(err, ValueError) and f"{plain}: truncated IDX data" in str(err)
    assert peak < MiB
    # 2**64 bytes: over the absolute limit, for plain files too
    for name, wrap in (("huge.gz", gzip.compress), ("huge", lambda b: b)):
        path = tmp_path / name
        path.write_bytes(wrap(_idx_header(0x0E, (2**32 - 1, 2**32 - 1)) + bytes(8)))
        err, peak, _ = _peak(read_idx, path)
        assert isinstance(err, ValueError) and str(path) in str(err), err
        assert peak < MiB


def test_idx_declared_size_limit_is_adjustable(tmp_path):
    path = write_idx(tmp_path / "a.gz", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="limit of 79 bytes"):
        read_idx(path, max_bytes=79)
    assert read_idx(path, max_bytes=80).shape == (4, 5)


def test_gzip_truncated_and_trailing_payload_named(tmp_path):
    head = _idx_header(0x0D, (50, 5))
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(head + bytes(999)))
    with pytest.raises(ValueError, match="truncated IDX data.*got 999") as info:
        read_idx(short)
    assert str(short) in str(info.value)
    long = tmp_path / "long.gz"
    long.write_bytes(gzip.compress(head + bytes(1000 + 7)))
    with pytest.raises(ValueError, match="^.*long.gz: 7 trailing bytes"):
        read_idx(long)
    plain = tmp_path / "plain"
    plain.write_bytes(head + bytes(1003))
    with pytest.raises(ValueError, match="plain: 3 trailing bytes"):
        read_idx(plain)


def test_idx_read_memory_is_one_copy_of_the_payload(tmp_path):
    # big-endian float32, gzip: swapped in place, decompressed in chunks: about 1x the payload
    arr = np.arange(MiB, dtype=np.float32).reshape(512, -1)
    path = tmp_path / "big.gz"
    path.write_bytes(gzip.compress(_idx_header(0x0D, arr.shape) + arr.astype(">f4").tobytes(),
                                   compresslevel=1))
    out, peak, _ = _peak(read_idx, path)
    assert np.array_equal(out, arr) and out.flags.writeable and out.dtype == np.float32
    assert peak < arr.nbytes + 3 * MiB, peak / arr.nbytes


@st.composite
def _damaged(draw):
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    arr = np.arange(math.prod(shape), dtype=dtype).reshape(shape)
    gz = draw(st.booleans())
    blob = bytearray(gzip.compress(_idx_header(
        {np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D, np.float64: 0x0E}[dtype], tuple(shape))
        + arr.astype(np.dtype(dtype).newbyteorder(">")).tobytes(), mtime=0) if gz else
        _idx_header({np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D, np.float64: 0x0E}[dtype],
                    tuple(shape)) + arr.astype(np.dtype(dtype).newbyteorder(">")).tobytes())
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "append", "insert"]))
        at = draw(st.integers(0, max(len(blob) - 1, 0)))
        if how == "flip" and blob:
            blob[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del blob[at:]
        elif how == "append":
            blob += draw(st.binary(min_size=1, max_size=32))
        else:
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(blob), gz


@FAST
@given(case=_damaged())
def test_read_idx_byte_corruption_is_a_named_error_or_a_bounded_array(case):
    blob, gz = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x-idx.gz" if gz else "x-idx")
        path.write_bytes(blob)
        try:
            arr = read_idx(path)
        except ValueError as e:
            assert str(path) in str(e)
        else:  # what came back cannot be larger than the file could hold
            assert arr.nbytes <= 1100 * len(blob)


# ---------------------------------------------------------------------------------------------
# 2. Labels
# ---------------------------------------------------------------------------------------------


def _idx_dir(directory: Path, train_labels, test_labels=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        if labels is None:
            labels = np.zeros(4, dtype=np.uint8)
        labels = np.asarray(labels)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz",
                  np.zeros((len(labels), 3, 3), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return directory


def test_one_huge_label_is_refused_not_turned_into_33_million_classes(tmp_path):
    labels = np.zeros(20, dtype=np.int32)
    labels[7] = 2**25
    d = _idx_dir(tmp_path / "toyset", labels)
    err, peak, _ = _peak(load_dataset, d)
    bad = d / "train-labels-idx1-ubyte.gz"
    assert isinstance(err, ValueError), err
    assert str(bad) in str(err) and "33554432" in str(err) and "sample 7" in str(err)
    assert peak < 4 * MiB
    # the other split's bad label does not enlarge this split's class list either
    ok = np.arange(20, dtype=np.int32) % 3
    _idx_dir(tmp_path / "other", ok, labels)
    assert load_dataset(tmp_path / "other").classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match="33554432") as info:
        load_dataset(tmp_path / "other", "test")
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_known_dataset_labels_outside_its_class_list_name_file_and_value(tmp_path, name):
    labels = np.arange(12, dtype=np.int16) % 10
    labels[5] = 12
    d = _idx_dir(tmp_path / name, labels)
    with pytest.raises(ValueError, match=r"label 12 \(sample 5\) out of range") as info:
        load_dataset(name, root=tmp_path)
    assert str(d / "train-labels-idx1-ubyte.gz") in str(info.value)
    labels[5] = -3
    _idx_dir(tmp_path / name, labels)
    with pytest.raises(ValueError, match=r"non-negative, found -3 \(sample 5\)"):
        load_dataset(name, root=tmp_path)


@FAST
@given(labels=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 12), min_size=1,
                       max_size=12))
def test_any_int32_labels_give_bounded_classes_or_a_named_error(labels):
    clear_cache()
    with tempfile.TemporaryDirectory() as d:
        directory = _idx_dir(Path(d) / "toyset", np.array(labels, dtype=np.int32))
        try:
            ds = load_dataset(directory)
        except ValueError as e:
            assert "train-labels-idx1-ubyte.gz" in str(e)
            assert min(labels) < 0 or max(labels) >= 10_000
        else:
            assert ds.num_classes == max(labels) + 1 <= 10_000


# ---------------------------------------------------------------------------------------------
# 3. Checkpoints whose spec does not fit their weights
# ---------------------------------------------------------------------------------------------


def _with_spec(tmp_path: Path, model: nn.Module, **changes) -> Path:
    """A checkpoint whose manifest and weights file both carry the hostile spec (a crafted
    file, or one written before the spec travelled with the weights): only the budget and the
    header comparison stand between it and the build."""
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "ckpt", model)
    manifest = json.loads(path.read_text())
    manifest["spec"].update(changes)
    weights = path.parent / manifest["weights"]
    save_file(load_file(str(weights)), str(weights),
              metadata={"format": "manifoldlens.checkpoint", "spec": json.dumps(manifest["spec"])})
    manifest["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))
    return path


def test_an_edited_manifest_spec_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", MLP((3,), 2, hidden=(4,), activation="relu"))
    manifest = json.loads(path.read_text())
    manifest["spec"]["activation"] = "tanh"  # same tensors, another model
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="spec differs from the one saved with the weights"):
        load_checkpoint(path)


def test_spec_asking_for_huge_layers_is_refused_before_building(tmp_path):
    # 3.6 GB of float32 once built: stopped on the meta device by the budget of the header
    path = _with_spec(tmp_path, MLP((3,), 2, hidden=(4, 4)), hidden=[30000, 30000])
    err, peak, seconds = _peak(load_checkpoint, path)
    assert isinstance(err, ValueError), err
    assert str(path) in str(err) and str(tmp_path / "ckpt.safetensors") in str(err)
    assert "far larger" in str(err) and "elements" in str(err)
    assert peak < 16 * MiB and seconds < 2, (peak, seconds)
    # within the budget but of other shapes: compared on the meta device, named
    path = _with_spec(tmp_path, MLP((3,), 2, hidden=(4, 4)), hidden=[200, 4])
    err, peak, seconds = _peak(load_checkpoint, path)
    assert isinstance(err, ValueError), err
    assert str(tmp_path / "ckpt.safetensors") in str(err) and "3 tensors of other shapes" in \
        str(err)
    assert "net.1.weight: (4, 3) in the file, (200, 3) in the model" in str(err)
    assert peak < 16 * MiB and seconds < 2, (peak, seconds)


def test_spec_asking_for_ten_million_couplings_is_refused_at_once(tmp_path):
    path = _with_spec(tmp_path, NICE((4,), couplings=2, hidden=4, depth=1), couplings=10**7)
    err, peak, seconds = _peak(load_checkpoint, path)
    assert isinstance(err, ValueError), err
    assert str(path) in str(err) and "far larger" in str(err)
    assert peak < 16 * MiB and seconds < 2, (peak, seconds)


def test_spec_missing_or_extra_tensors_are_counted_and_named(tmp_path):
    path = _with_spec(tmp_path, MLP((3,), 2, hidden=(4,)), hidden=[4, 4, 4])
    with pytest.raises(ValueError, match=r"2 tensors of other shapes \(net.3.weight: \(2, 4\) "
                       r"in the file, \(4, 4\).*4 tensors missing from the file \(net.5.weight")\
            as info:
        load_checkpoint(path)
    assert "ckpt.safetensors" in str(info.value)
    path = _with_spec(tmp_path, MLP((3,), 2, hidden=(4, 4)), hidden=[4])
    with pytest.raises(ValueError, match="tensors not in the model"):
        load_checkpoint(path)
    path = _with_spec(tmp_path, MLP((3,), 2, hidden=(4,)), hidden="wide")
    with pytest.raises(ValueError, match="ckpt.json: cannot build the model of its spec"):
        load_checkpoint(path)


def _nice_v01():
    old = NICE((6,), hidden=8, depth=1, split="mask")
    old.spec.pop("split")  # a checkpoint of version 0.1: no split, no 'initialized' buffer
    old.v01 = True
    return old


@pytest.mark.parametrize("make", [
    lambda: MLP((3,), 2, hidden=(4,)),
    lambda: Linear((2, 3), 4),
    lambda: SmallCNN((1, 8, 8), 3, channels=(2,), hidden=5),
    lambda: Seed001CNN((1, 10, 10), 3, log_softmax=True),
    lambda: NICE((4,), couplings=2, hidden=8, depth=2),
    lambda: NICE((1, 2, 2), couplings=3, hidden=8, depth=1, split="mask"),
    _nice_v01,
    lambda: RealNVP((6,), couplings=3, hidden=8),
    lambda: RealNVP((1, 4, 4), scales=2, hidden_channels=4, blocks=1),
    lambda: Glow((1, 4, 4), levels=2, depth=2, hidden_channels=4),
    lambda: VAE((1, 8, 8), latent_dim=2, network="mlp", hidden=8),
    lambda: VAE((1, 32, 32), latent_dim=2, hidden=8),
    lambda: BetaTCVAE((1, 8, 8), latent_dim=2, network="mlp", hidden=8),
    lambda: AutoEncoder((1, 8, 8), latent_dim=2, network="mlp", hidden=8),
], ids=["mlp", "linear", "small_cnn", "seed001", "nice", "nice-mask", "nice-v0.1",
        "realnvp-vec", "realnvp-img", "glow", "vae", "vae-conv", "betatcvae", "autoencoder"])
def test_every_architecture_still_round_trips(tmp_path, make):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = model.state_dict()
    v01 = getattr(model, "v01", False)
    if v01:
        state = {k: v for k, v in state.items() if not k.endswith("initialized")}
    path = save_checkpoint(tmp_path / "m", model)
    if v01:  # rewrite the weights as version 0.1 wrote them
        from safetensors.torch import save_file

        from manifoldlens._utils import sha256_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
        manifest = json.loads(path.read_text())
        manifest["sha256"] = sha256_file(tmp_path / "m.safetensors")
        path.write_text(json.dumps(manifest))
    loaded, _ = load_checkpoint(path)
    got = loaded.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def _forge(weights: Path, manifest: Path, blob: bytes) -> None:
    """Replace the weights and record their sha256: a hostile pair, consistent with itself."""
    from manifoldlens._utils import sha256_file

    weights.write_bytes(blob)
    doc = json.loads(manifest.read_text())
    doc["sha256"] = sha256_file(weights)
    manifest.write_text(json.dumps(doc))


@FAST
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255),
                                st.sampled_from(["flip", "cut", "insert"])), min_size=1,
                      max_size=3))
def test_corrupt_safetensors_is_a_named_error_or_loads(edits):
    with tempfile.TemporaryDirectory() as d:
        path = save_checkpoint(Path(d) / "m", MLP((3,), 2, hidden=(4,)))
        weights = Path(d) / "m.safetensors"
        blob = bytearray(weights.read_bytes())
        for at, value, how in edits:
            at %= len(blob)
            if how == "flip":
                blob[at] ^= value
            elif how == "cut":
                del blob[at:]
            else:
                blob[at:at] = bytes([value])
            if not blob:
                break
        _forge(weights, path, bytes(blob))
        try:
            model, _ = load_checkpoint(path)
        except ValueError as e:
            assert "m.safetensors" in str(e) or "m.json" in str(e), e
        else:
            assert all(torch.isfinite(p).all() for p in model.parameters())


@FAST
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255),
                                st.sampled_from(["flip", "cut", "insert"])), min_size=1,
                      max_size=3))
def test_corrupt_manifest_is_a_named_error_or_loads(edits):
    with tempfile.TemporaryDirectory() as d:
        path = save_checkpoint(Path(d) / "m", MLP((3,), 2, hidden=(4,)), metadata={"a": 1.5})
        blob = bytearray(path.read_bytes())
        for at, value, how in edits:
            at %= max(len(blob), 1)
            if how == "flip" and blob:
                blob[at] ^= value
            elif how == "cut":
                del blob[at:]
            else:
                blob[at:at] = bytes([value])
        path.write_bytes(bytes(blob))
        try:
            load_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            assert str(d) in str(e), e


# ---------------------------------------------------------------------------------------------
# 5. metrics.jsonl cut short by a kill
# ---------------------------------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    return [{"step": i, "loss": 1.0 / (i + 1), "note": "é" * (i % 3)} for i in range(n)]


def _run_with_log(tmp_path: Path, tail: bytes) -> Run:
    run = Run(tmp_path / "r", "test")
    for rec in _records(4):
        run.log(**rec)
    with open(run.path / "metrics.jsonl", "ab") as fh:
        fh.write(tail)
    return run


def test_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path):
    with _run_with_log(tmp_path, b'{"step": 4, "lo') as run:
        log = run.path / "metrics.jsonl"
        with pytest.warns(UserWarning, match=f"{log}: dropped its last line"):
            assert run.read_log() == _records(4)
        with pytest.warns(UserWarning, match="dropped its last line"):
            run.truncate_log(2)
        assert log.read_text().splitlines() == [json.dumps(r) for r in _records(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert run.read_log("loss") == _records(3)  # repaired: no more warnings


def test_invalid_line_inside_the_log_names_file_and_line(tmp_path):
    with _run_with_log(tmp_path, b'{"step": 4, "lo\n' + json.dumps({"step": 5}).encode() +
                       b"\n") as run:
        for call in (run.read_log, lambda: run.truncate_log(3)):
            with pytest.raises(ValueError, match=r"metrics.jsonl: line 5 is not a valid") as i:
                call()
            assert str(run.path / "metrics.jsonl") in str(i.value)


def test_appending_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    with _run_with_log(tmp_path, b'{"step": 4, "lo') as run:
        with pytest.warns(UserWarning, match="removed its last line"):
            run.log(step=9)
        assert run.read_log() == [*_records(4), {"step": 9}]
    with _run_with_log(tmp_path / "b", b'{"step": 4}') as run:  # whole, but for its newline
        run.log(step=9)
        assert run.read_log() == [*_records(4), {"step": 4}, {"step": 9}]


def test_resume_after_a_kill_mid_append(tmp_path):
    from manifoldlens.training import RunOptions, train_classifier

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 2, 2), torch.arange(32) % 2

    def train(steps, resume):
        torch.manual_seed(0)
        with Run(tmp_path / "r", "train", resume=resume) as run:
            train_classifier(Linear((1, 2, 2), 2), (x, y), steps=steps, batch_size=8,
                             progress=False, run=RunOptions(run, checkpoint_every=2,
                                                            resume=resume))
            return run

    run = train(4, False)
    with open(run.path / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 5, "loss": 0.69')  # killed mid-append
    with pytest.warns(UserWarning, match="metrics.jsonl"):
        run = train(6, True)
    steps = [r["step"] for r in Run(run.path, "train", resume=True).read_log("loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


@FAST
@given(cut=st.integers(0, 10**4))
def test_a_log_cut_at_any_byte_reads_its_whole_records(cut):
    with tempfile.TemporaryDirectory() as d:
        lines = [json.dumps(r) + "\n" for r in _records(6)]
        blob = "".join(lines).encode()
        cut %= len(blob) + 1
        log = Path(d) / "r" / "metrics.jsonl"
        log.parent.mkdir()
        log.write_bytes(blob[:cut])
        run = Run(log.parent, "test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = run.read_log()
        whole = len(blob[:cut].split(b"\n")) - 1
        assert got[:whole] == _records(whole) and len(got) - whole in (0, 1)
        run.finish()


# ---------------------------------------------------------------------------------------------
# 6. Small mismatches
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_saved_into_a_directory_loads_from_it(tmp_path):
    model = MLP((3,), 2, hidden=(4,))
    save_checkpoint(tmp_path, model, metadata={"k": 1})
    loaded, meta = load_checkpoint(tmp_path)
    assert meta == {"k": 1} and torch.equal(loaded.net[1].weight, model.net[1].weight)
    fresh = MLP((3,), 2, hidden=(4,))
    assert load_weights(tmp_path, fresh) == {"k": 1} == checkpoint_metadata(tmp_path)
    assert torch.equal(fresh.net[1].weight, model.net[1].weight)


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_inf_are_written_as_standard_json_everywhere(tmp_path):
    odd = {"nan": float("nan"), "inf": float("inf"), "ninf": -np.inf,
           "arr": np.array([1.0, np.nan]), "t": torch.tensor([np.inf]), "n": np.float64("nan")}
    expected = {"nan": None, "inf": "inf", "ninf": "-inf", "arr": [1.0, None], "t": ["inf"],
                "n": None}
    path = save_checkpoint(tmp_path / "m", MLP((3,), 2, hidden=(4,)), metadata=odd)
    assert _strict_json(path.read_text())["metadata"] == expected
    assert checkpoint_metadata(path) == expected
    with Run(tmp_path / "r", "test", {"lr": float("nan")}) as run:
        run.log(step=1, **odd)
        run.save_json("extra", odd)
        run.metrics["best"] = float("inf")
    for name in ("run.json", "extra.json", "metrics.jsonl"):
        doc = _strict_json((run.path / name).read_text())
        if name == "run.json":
            assert doc["config"] == {"lr": None} and doc["metrics"] == {"best": "inf"}
        else:
            assert {k: doc[k] for k in expected} == expected


def test_mixed_float32_float64_checkpoint_keeps_each_dtype(tmp_path):
    model = MLP((3,), 2, hidden=(4,))
    model.net[3].double()
    save_checkpoint(tmp_path / "m", model)
    loaded, _ = load_checkpoint(tmp_path / "m")
    got = {k: v.dtype for k, v in loaded.state_dict().items()}
    assert got == {k: v.dtype for k, v in model.state_dict().items()}
    assert got["net.3.weight"] == torch.float64 and got["net.1.weight"] == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path):
    model = MLP((3,), 2, hidden=(4,))
    with torch.no_grad():
        model.net[3].bias[1] = float("nan")
        model.net[3].weight[0, 0] = float("inf")
    path = save_checkpoint(tmp_path / "m", model)
    for load in (lambda **k: load_checkpoint(path, **k),
                 lambda **k: load_weights(path, MLP((3,), 2, hidden=(4,)), **k)):
        with pytest.raises(ValueError, match=r"m.safetensors: tensor 'net.3.(weight|bias)' holds "
                                             r"1 NaN/Inf") as info:
            load()
        assert str(tmp_path / "m.safetensors") in str(info.value)
        load(allow_nonfinite=True)
    loaded, _ = load_checkpoint(path, allow_nonfinite=True)
    assert torch.isnan(loaded.net[3].bias[1])


def test_idx_cache_sees_a_same_size_same_mtime_rewrite(tmp_path):
    clear_cache()
    # random bytes do not compress: the gzip file keeps its size too
    old = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    new = old.copy()
    new[3, 3] ^= 0xFF  # one byte in the middle
    for name in ("a-idx", "a-idx.gz"):
        path = write_idx(tmp_path / name, old)
        st = path.stat()
        assert np.array_equal(read_idx_shared(path), old)
        write_idx(path, new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
        assert np.array_equal(read_idx_shared(path), new)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("metadata", "not a dict", "must be JSON objects"),
    ("spec", [1, 2], "must be JSON objects"),
    # an edited spec: refused against the spec saved with the weights (else: cannot build)
    ("spec", {"arch": "resnet"}, "spec differs from the one saved|unknown architecture"),
    ("spec", {"arch": "mlp", "in_shape": [-3], "num_classes": 2}, "spec differs|cannot build"),
    ("weights", "../elsewhere.safetensors", "outside its directory"),
    ("weights", 5, "names no weights file"),
    ("format", "pickle", "not a manifoldlens checkpoint manifest"),
])
def test_hostile_manifest_fields_name_the_file(tmp_path, field, value, message):
    path = save_checkpoint(tmp_path / "m", MLP((3,), 2, hidden=(4,)))
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(path)
    assert str(tmp_path) in str(info.value)
