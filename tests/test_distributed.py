"""Many processes: under torch.distributed (two gloo processes on the CPU) the sharded library
calls and commands give what one process gives, ``torchrun … -m manifoldlens gram`` writes
the same M as the single-process command, and the out-of-core Gram resumes after a kill,
computing only the blocks it had not recorded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from manifoldlens import blockgram, distributed
from manifoldlens.cli import main
from manifoldlens.commands.classifier import run_gram, run_spectrum
from manifoldlens.commands.common import dataset_for
from manifoldlens.commands.leaf import run_leaf_across, run_leaf_horizontal
from manifoldlens.commands.manifold import run_manifold_fraction
from manifoldlens.generative import ManifoldDataset
from manifoldlens.jacobian import jacobian_gram
from manifoldlens.models import create_model, load_checkpoint, save_checkpoint
from manifoldlens.runs import RunFollower

from helpers import TinyCNN, make

TESTS = Path(__file__).resolve().parent
jacobian_module = import_module("manifoldlens.jacobian")  # the package exports a function so named
COMMON = ["--no-progress"]


def _gram_inputs(n: int = 23):
    model = make(TinyCNN())
    x = torch.randn(n, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return model, x


class Captured(RunFollower):
    """A run that keeps what a command saves (arrays, JSON) in memory and draws nothing."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "test")
        path.mkdir(parents=True, exist_ok=True)
        self.saved: dict[str, object] = {}

    def save_arrays(self, name: str, **arrays) -> Path:
        self.saved[name] = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
        return super().save_arrays(name, **arrays)

    def save_json(self, name: str, obj) -> Path:
        self.saved[name] = json.loads(json.dumps(obj, default=float))
        return super().save_json(name, obj)


def _unseeded_fraction(run: Captured, files: Path, rank: int) -> dict[str, object]:
    """``manifold fraction`` with SmoothGrad seeded by the global RNG, seeded here per rank
    as the single process seeds it on rank 0: the other rank's draw must not matter."""
    torch.manual_seed(100 + rank)
    return run_manifold_fraction(run, [str(files / "mclf.json")], str(files / "mds"),
                                 names=["m"], n=11, methods=("smoothgrad",),
                                 options={"smoothgrad": {"samples": 4}})


def _sharded(files: Path, out: Path, rank: int = 0) -> dict[str, dict[str, object]]:
    """The sharded commands' functions, small, each on a :class:`Captured` run in
    ``out/<name>``: what each saved (``rank``: this process's, 0 in a single one)."""
    model, meta = load_checkpoint(files / "clf.json")
    ds = dataset_for(meta, limit=30)
    calls = {
        "gram": lambda run: run_gram(run, model, ds, batch_size=4, block_size=7, neighbors=3,
                                     progress=False),
        "spectrum": lambda run: run_spectrum(run, model, ds, batch_size=7, top_k=4,
                                             progress=False),
        "across": lambda run: run_leaf_across(run, model, ds, n=5, steps=7, record_every=3,
                                              progress=False),
        "horizontal": lambda run: run_leaf_horizontal(
            run, model, ds, pairs=5, steps=9, record_every=2, tol=4.0, capped=True,
            step_size=0.3, progress=False),
        "fraction": lambda run: run_manifold_fraction(
            run, [str(files / "mclf.json")], str(files / "mds"), names=["m"], n=11, top_k=2,
            methods=("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"),
            options={"smoothgrad": {"samples": 4, "seed": 5}}),
        "fraction_rng": lambda run: _unseeded_fraction(run, files, rank),
    }
    saved = {}
    for name, call in calls.items():
        run = Captured(out / name)
        metrics = call(run)
        saved[name] = {**run.saved, "metrics": metrics}
    return saved


def _worker(rank: int, world: int, tmp: Path) -> None:
    """One of two spawned processes: the library, the sharded commands' functions and one
    whole command, under a group it made itself."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank,
                            world_size=world)
    try:
        part = distributed.shard(11)
        got = {"shards": distributed.gather(torch.arange(11)[part] * 10),
               "flags": distributed.gather(torch.arange(11)[part] % 2 == 0),
               "objects": distributed.gather_objects(rank),
               "aligned": [(s.start, s.stop) for s in distributed.shares(10, align=4)]}
        model, x = _gram_inputs()
        got["ram"] = jacobian_gram(model, x, batch_size=4, block_size=5)
        (tmp / "cache").mkdir(exist_ok=True)
        got["scratch"] = jacobian_gram(model, x, batch_size=4, block_size=5, low_memory=True,
                                       cache_dir=tmp / "cache")
        got["file"] = jacobian_gram(model, x, batch_size=4, block_size=5, normalize=True,
                                    out=tmp / "m.npy").clone()
        got["commands"] = _sharded(tmp / "files", tmp / "two", rank)
        if rank == 0:
            torch.save(got, tmp / "library.pt")
        assert main(["leaf", "across", str(tmp / "files" / "clf.json"), "--n", "3", "--steps",
                     "4", "--out", str(tmp / "across"), *COMMON]) == 0
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A digits classifier, and a manifold dataset with a classifier of its images."""
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    save_checkpoint(root / "clf", create_model("mlp", (1, 8, 8), 10, hidden=(16,)),
                    metadata={"data": "digits", "classes": [str(i) for i in range(10)]})
    g = torch.Generator().manual_seed(1)
    n, k, d = 11, 3, 64
    tangent = torch.linalg.qr(torch.randn(n, d, k, generator=g)).Q.mT.contiguous()
    ManifoldDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g),
                    torch.randn(n, k, generator=g), tangent, ["a", "b"], {}).save(root / "mds"
                                                                                   / "test")
    save_checkpoint(root / "mclf", create_model("mlp", (1, 8, 8), 2, hidden=(12,)))
    return root


@pytest.fixture(scope="module")
def two(files, tmp_path_factory) -> Path:
    """Everything the two processes wrote."""
    tmp = tmp_path_factory.mktemp("two")
    shutil.copytree(files, tmp / "files")
    mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)
    return tmp


def test_without_a_group_everything_is_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(7) == slice(0, 7) == distributed.shard(7, align=3)
    t = torch.arange(5)
    assert distributed.gather(t) is t
    assert distributed.gather_objects("a") == ["a"] and distributed.broadcast_object(3) == 3
    distributed.barrier()


def test_gather_joins_unequal_shards_in_order(two):
    got = torch.load(two / "library.pt")
    assert torch.equal(got["shards"], torch.arange(11) * 10)  # shares of 5 and 6
    assert torch.equal(got["flags"], torch.arange(11) % 2 == 0) and got["objects"] == [0, 1]
    assert got["aligned"] == [(0, 4), (4, 10)]  # whole groups of 4


def test_gram_in_two_processes_equals_one_bit_for_bit(two, tmp_path):
    got = torch.load(two / "library.pt")
    model, x = _gram_inputs()
    one = jacobian_gram(model, x, batch_size=4, block_size=5)
    assert torch.equal(got["ram"], one) and torch.equal(got["scratch"], one)
    assert torch.equal(one, one.T)  # exactly symmetric
    cos = jacobian_gram(model, x, batch_size=4, block_size=5, normalize=True,
                        out=tmp_path / "m.npy")
    assert torch.equal(got["file"], cos)
    flat = jacobian_module.jacobian(model, x, output="softmax").reshape(len(x), -1)
    torch.testing.assert_close(one, flat @ flat.T)
    assert not list((two / "cache").iterdir())  # the shared scratch file is gone


def _close(a: object, b: object, where: str) -> None:
    """Equal structures; numbers and tensors equal to float32 rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=where)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


def test_sharded_commands_in_two_processes_equal_one(files, two, tmp_path):
    got = torch.load(two / "library.pt")["commands"]
    one = _sharded(files, tmp_path)
    assert set(got) == set(one) == {"gram", "spectrum", "across", "horizontal", "fraction",
                                    "fraction_rng"}
    for name in one:
        _close(one[name], got[name], name)
    for name in ("fraction", "fraction_rng"):  # SmoothGrad too: the noise one process draws
        sg = [r[name]["results"]["models"]["m"]["methods"]["smoothgrad"] for r in (one, got)]
        for space in ("tangent", "dx"):
            assert sg[1][space] == pytest.approx(sg[0][space], rel=1e-5, abs=1e-6), space
    assert got["spectrum"]["metrics"]["top_k"] == 4 and got["fraction"]["results"]["models"][
        "m"]["top_k"] == 2
    gram = np.load(two / "two" / "gram" / "gram.npy")
    assert np.array_equal(gram, np.load(tmp_path / "gram" / "gram.npy"))  # bit for bit
    assert {p.name for p in (two / "two" / "across").iterdir()} == {"state-0-2", "state-2-5"}


def test_a_command_in_a_group_writes_once_from_rank_0(two):
    doc = json.loads((two / "across" / "run.json").read_text())
    assert doc["status"] == "ok" and doc["config"]["world_size"] == 2
    lines = (two / "across" / "metrics.jsonl").read_text().splitlines()
    assert sum("summary" in line for line in lines) == 1
    assert np.load(two / "across" / "across.npz")["points"].shape[1] == 3


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_gram_writes_the_single_process_matrix(files, tmp_path):
    args = ["gram", str(files / "clf.json"), "--limit", "30", "--batch-size", "4",
            "--block-size", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m",
                           "manifoldlens", *args, "--out", str(tmp_path / "two"), *COMMON],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("gram: ") == 1  # rank 0 alone prints
    assert main([*args, "--out", str(tmp_path / "one"), *COMMON]) == 0
    one, two = np.load(tmp_path / "one" / "gram.npy"), np.load(tmp_path / "two" / "gram.npy")
    assert np.array_equal(one, two)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["config"]["world_size"] == 2


def test_n_has_a_spelling_that_torchrun_leaves_alone():
    # torchrun's own parser reads --n as an ambiguous abbreviation of its options
    from manifoldlens.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["leaf", "horizontal", "c.json", "--count", "3"]).n == 3
    assert parser.parse_args(["leaf", "across", "c.json", "--count", "4"]).n == 4
    assert parser.parse_args(["manifold", "fraction", "ds", "m.json", "--count", "5"]).n == 5


def test_commands_that_do_not_shard_refuse_torchrun(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["leaf", "involutivity", str(files / "clf.json"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_top_k_is_an_option_of_the_commands_that_build_G(files, tmp_path, capsys):
    clf = str(files / "clf.json")
    out = tmp_path / "k3"
    assert main(["leaf", "across", clf, "--n", "2", "--steps", "2", "--top-k", "3", "--out",
                 str(out), *COMMON]) == 0
    assert json.loads((out / "run.json").read_text())["config"]["top_k"] == 3
    assert main(["leaf", "across", clf, "--n", "2", "--steps", "2", "--top-k", "11", "--out",
                 str(tmp_path / "k11"), *COMMON]) == 2  # C = 10
    assert "top_k must be an integer in [1, C] = [1, 10]" in capsys.readouterr().err
    for argv in (["spectrum", clf], ["leaf", "horizontal", clf], ["leaf", "mirror", clf],
                 ["leaf", "noisy", clf], ["manifold", "fraction", "ds", "m.json"]):
        with pytest.raises(SystemExit):
            main([*argv, "--top-k", "0"])  # a usage error of argparse: top-k >= 1
    assert "--top-k: must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------ out of core, resumable

KILLED = """
import sys, time
sys.path.insert(0, {tests!r})
from helpers import TinyCNN, make
import torch
from manifoldlens import blockgram
from manifoldlens.jacobian import jacobian_gram

tile = blockgram.gram_tile
def slow(a, b, normalize):
    time.sleep(0.04)
    return tile(a, b, normalize)
blockgram.gram_tile = slow
model = make(TinyCNN())
x = torch.randn(40, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
jacobian_gram(model, x, batch_size=6, block_size=4, out=sys.argv[1])
"""


def _recorded(progress: Path, kind: str) -> set[int]:
    done: set[int] = set()
    for part in progress.glob("rank-*.json"):
        try:
            value = int(json.loads(part.read_text())[kind], 16)
        except (ValueError, KeyError):
            continue
        done |= {i for i in range(value.bit_length()) if value >> i & 1}
    return done


def _counting(monkeypatch) -> dict[str, int]:
    counts = {"rows": 0, "tiles": 0}
    jac, tile = jacobian_module.jacobian, blockgram.gram_tile

    def rows(model, x, **kw):
        counts["rows"] += x.shape[0]
        return jac(model, x, **kw)

    def tiles(a, b, normalize):
        counts["tiles"] += 1
        return tile(a, b, normalize)

    monkeypatch.setattr(jacobian_module, "jacobian", rows)
    monkeypatch.setattr(blockgram, "gram_tile", tiles)
    return counts


def test_out_of_core_gram_resumes_after_a_kill(tmp_path, monkeypatch):
    out = tmp_path / "M.npy"
    progress = tmp_path / "M.npy.progress"
    proc = subprocess.Popen([sys.executable, "-c", KILLED.format(tests=str(TESTS)), str(out)])
    deadline = time.monotonic() + 120
    try:
        while len(_recorded(progress, "tiles")) < 6:
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = _recorded(progress, "tiles")
    assert 6 <= len(done) < 55  # 10 tiles of 4 rows: 55 in the lower triangle
    assert len(_recorded(progress, "jacobians")) == 7  # every row block before any tile

    counts = _counting(monkeypatch)
    model, x = _gram_inputs(40)
    m = jacobian_gram(model, x, batch_size=6, block_size=4, out=out)
    assert counts == {"rows": 0, "tiles": 55 - len(done)}  # only what was missing
    whole = jacobian_gram(model, x, batch_size=6, block_size=4, out=tmp_path / "whole.npy")
    assert torch.equal(m, whole)
    assert json.loads((progress / "state.json").read_text())["complete"]
    assert not (progress / "jacobians.npy").exists()  # the scratch rows are deleted

    holder = blockgram.BlockRecord(progress, {}, ())
    holder.acquire("M.npy")  # another computation of the same output, still running
    try:
        with pytest.raises(FileExistsError, match=f"another process \\(pid {os.getpid()}\\)"):
            jacobian_gram(model, x, batch_size=6, block_size=4, out=out)
    finally:
        holder.release()
    counts.update(rows=0, tiles=0)
    again = jacobian_gram(model, x, batch_size=6, block_size=4, out=out)
    assert torch.equal(again, whole) and counts == {"rows": 0, "tiles": 0}
    with pytest.raises(ValueError, match="differing: .*normalize"):
        jacobian_gram(model, x, batch_size=6, block_size=4, out=out, normalize=True)
    with pytest.raises(ValueError, match="data_sha256"):
        jacobian_gram(model, x * 2, batch_size=6, block_size=4, out=out)
