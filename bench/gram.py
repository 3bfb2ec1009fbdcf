"""The Jacobian correlation matrix M = 𝒥𝒥ᵀ at data-set size: one process against several,
and out of core with an interruption and a resume.

Usage::

    .venv/bin/python bench/gram.py --checkpoint RUN/model.json [--n 10000] [--split test]
        [--processes 1,2] [--modes memory,file] [--ooc-n 60000] [--ooc-split train]
        [--ooc-processes 2] [--kill-at 0.4] [--batch-size 256] [--block-size N]
        [--threads 1] [--device cpu] [--workdir DIR] [--skip-ooc] [--skip-compare]

Prints ONE JSON object on stdout; progress goes to stderr. The model is the seed-001 CNN of
``--checkpoint`` (e.g. ``manifoldlens leaf train --data fashion-mnist``), M is that of the
Jacobians of log-softmax (``output="log_softmax"``), the data the first ``--n`` images of the
Fashion-MNIST split (``/usr/share/datasets/fashion-mnist``).

1. ``compare``: :func:`manifoldlens.jacobian_gram` on the ``--n`` images in one process
   (plain ``python``) and under ``torchrun --standalone --nproc_per_node W`` for each W of
   ``--processes``, ``--threads`` torch threads per process, in each mode of ``--modes``:
   ``memory`` (𝒥 and M in RAM, shares gathered) and ``file`` (``out=``: 𝒥 through a scratch
   file, M written tile by tile into a ``.npy``). Wall time of the call, peak RSS (VmHWM) of
   every process, and the sha256 of M: the same for every W.
2. ``out_of_core``: ``--ooc-n`` images of ``--ooc-split`` into a ``.npy`` under
   ``--ooc-processes`` processes; killed (SIGKILL to the whole launch) once a fraction
   ``--kill-at`` of the tiles is recorded, then the same command again, which resumes. Wall
   times of both parts, the tiles each computed, peak RSS of every process against the size
   of M, and a spot check of M against Jacobians computed afresh for 64 random images.

Each measured call runs in a fresh process (``--_worker``), which reports its own numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _common as common
from _common import log

BENCH = Path(__file__).resolve()
DATA = "fashion-mnist"


# --------------------------------------------------------------------------------------
# The measured call, in its own process (one of several under torchrun)
# --------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    from manifoldlens import distributed
    from manifoldlens.data import load_dataset
    from manifoldlens.jacobian import jacobian_gram
    from manifoldlens.models import load_checkpoint

    torch.set_num_threads(args.threads)
    with distributed.process_group(args.device):
        device = distributed.local_device(args.device)
        model, _ = load_checkpoint(args.checkpoint, map_location=device)
        x = load_dataset(DATA, args.split).images[: args.images].to(device)
        rss_loaded = common.current_rss_mb()
        common.reset_peak_rss()
        common.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        m = jacobian_gram(model, x, output="log_softmax", model_output=args.model_output,
                          batch_size=args.batch_size, block_size=args.block_size,
                          out=args.out or None)
        common.sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = common.peak_rss_mb()
        rank, world = distributed.rank(), distributed.world_size()
        if rank == 0 and not args.out and args.save:
            np.save(args.save, m.numpy())
        distributed.barrier()
    record = {"rank": rank, "world_size": world, "n": args.images, "wall_s": round(wall, 2),
              "cpu_s": round(cpu, 2),
              "rss_after_loading_MiB": None if rss_loaded is None else round(rss_loaded, 1),
              "peak_rss_MiB": round(peak, 1), "threads": torch.get_num_threads()}
    Path(f"{args.report}.rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------
# The parent: launches, kills, compares
# --------------------------------------------------------------------------------------


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _command(args: argparse.Namespace, world: int, n: int, split: str, out: str, save: str,
             report: Path) -> list[str]:
    # no option that is a prefix of one of torchrun's (--n would be ambiguous to it)
    worker_args = ["--_worker", "--checkpoint", args.checkpoint, "--images", str(n),
                   "--split", split,
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--device", args.device, "--model-output", args.model_output,
                   "--report", str(report)]
    if args.block_size:
        worker_args += ["--block-size", str(args.block_size)]
    if out:
        worker_args += ["--out", out]
    if save:
        worker_args += ["--save", save]
    if world == 1:
        return [sys.executable, str(BENCH), *worker_args]
    return [*_torchrun(), "--standalone", "--nproc_per_node", str(world), str(BENCH),
            *worker_args]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _reports(report: Path) -> list[dict]:
    found = sorted(report.parent.glob(report.name + ".rank*.json"))
    return [json.loads(p.read_text()) for p in found]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def bench_compare(args: argparse.Namespace, work: Path) -> dict:
    results: dict[str, dict] = {}
    digests: dict[str, str] = {}
    for mode in args.modes.split(","):
        for world in [int(w) for w in args.processes.split(",")]:
            name = f"{mode}_{world}proc"
            out = str(work / f"{name}.npy") if mode == "file" else ""
            save = "" if mode == "file" else str(work / f"{name}.npy")
            report = work / name
            for p in [*work.glob(f"{name}.npy*"), *work.glob(f"{name}.rank*.json")]:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            log(f"compare: {name}: n = {args.n}")
            t0 = time.perf_counter()
            proc = subprocess.run(_command(args, world, args.n, args.split, out, save, report),
                                  env=_env(args.threads), stdout=subprocess.DEVNULL)
            launch = time.perf_counter() - t0
            if proc.returncode != 0:
                results[name] = {"error": f"exit status {proc.returncode}"}
                continue
            ranks = _reports(report)
            digests[name] = _sha256(work / f"{name}.npy")
            results[name] = {
                "processes": world, "mode": mode,
                "wall_s_of_call": max(r["wall_s"] for r in ranks),
                "wall_s_of_launch": round(launch, 1),
                "cpu_s_per_process": [r["cpu_s"] for r in ranks],
                "peak_rss_MiB_per_process": [r["peak_rss_MiB"] for r in ranks],
                "rss_after_loading_MiB_per_process": [r["rss_after_loading_MiB"] for r in ranks],
                "sha256_of_M": digests[name],
            }
            log(f"compare: {name}: {results[name]['wall_s_of_call']} s (CPU "
                f"{results[name]['cpu_s_per_process']} s), peak RSS "
                f"{results[name]['peak_rss_MiB_per_process']} MiB")
            if mode == "memory" or not args.keep:
                (work / f"{name}.npy").unlink(missing_ok=True)
    ratios = {}
    for mode in args.modes.split(","):
        one = results.get(f"{mode}_1proc", {})
        for world in [int(w) for w in args.processes.split(",") if int(w) > 1]:
            many = results.get(f"{mode}_{world}proc", {})
            if "wall_s_of_call" in one and "wall_s_of_call" in many:
                ratios[f"{mode}: 1 process / {world} processes"] = round(
                    one["wall_s_of_call"] / many["wall_s_of_call"], 2)
    return {"n": args.n, "split": args.split, "results": results, "speed-up": ratios,
            "identical_M": len(set(digests.values())) == 1 if digests else None}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _tiles_done(progress: Path) -> int:
    done: set[int] = set()
    for part in progress.glob("rank-*.json"):
        try:
            value = int(json.loads(part.read_text())["tiles"], 16)
        except (OSError, ValueError, KeyError):
            continue
        done |= {i for i in range(value.bit_length()) if value >> i & 1}
    return len(done)


def bench_out_of_core(args: argparse.Namespace, work: Path) -> dict:
    n, world = args.ooc_n, args.ooc_processes
    out = work / f"M_{n}.npy"
    progress = work / f"M_{n}.npy.progress"
    from manifoldlens.blockgram import tile_rows

    width, itemsize = 10 * 784, 4
    block = args.block_size or tile_rows(width, itemsize, 2**30)
    tiles = -(-n // block)
    total = tiles * (tiles + 1) // 2
    for p in (out, progress):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    m_gb = n * n * itemsize / 1e9
    log(f"out_of_core: n = {n} ({m_gb:.1f} GB of M), {world} processes, {total} tiles; "
        f"kill at {args.kill_at:.0%} of the tiles")
    report = work / f"ooc_{n}"
    cmd = _command(args, world, n, args.ooc_split, str(out), "", report)

    # part 1: until a share of the tiles is recorded, then SIGKILL to the whole launch
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(args.threads), stdout=subprocess.DEVNULL,
                            start_new_session=True)
    peak: dict[int, float] = {}
    killed_at = None
    while proc.poll() is None:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            hwm = _status_mb(pid, "VmHWM")
            if hwm is not None:
                peak[pid] = max(peak.get(pid, 0.0), hwm)
        done = _tiles_done(progress)
        if done >= args.kill_at * total:
            # torchrun starts its workers in sessions of their own: kill each of them too
            workers = _descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            while any(Path(f"/proc/{pid}").exists() for pid in workers):
                time.sleep(0.1)
            killed_at = done
            break
        time.sleep(0.2)
    part1 = time.perf_counter() - t0
    if killed_at is None:
        return {"error": f"the first part ended (exit status {proc.returncode}) before it "
                "could be killed"}
    recorded = _tiles_done(progress)
    log(f"out_of_core: killed after {part1:.0f} s with {recorded}/{total} tiles recorded")

    # part 2: the same command again resumes
    for p in report.parent.glob(report.name + ".rank*.json"):
        p.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(args.threads), stdout=subprocess.DEVNULL)
    part2 = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"the resumed part exited with {proc.returncode}"}
    ranks = _reports(report)
    state = json.loads((progress / "state.json").read_text())
    check = _spot_check(args, out, n)
    size = out.stat().st_size
    peaks = [r["peak_rss_MiB"] for r in ranks]
    return {
        "n": n, "split": args.ooc_split, "processes": world, "threads_per_process": args.threads,
        "block_size": block, "tiles": total,
        "M_bytes": size, "M_GB": round(size / 1e9, 2),
        "part1_killed": {"wall_s": round(part1, 1), "tiles_recorded": recorded,
                         "peak_rss_MiB_per_process_seen": sorted(round(v, 1)
                                                                 for v in peak.values())},
        "part2_resumed": {"wall_s_of_launch": round(part2, 1),
                          "wall_s_of_call": max(r["wall_s"] for r in ranks),
                          "cpu_s_per_process": [r["cpu_s"] for r in ranks],
                          "tiles_computed": total - recorded,
                          "peak_rss_MiB_per_process": peaks},
        "complete": state.get("complete"),
        "peak_rss_over_M": round(max(peaks) * 2**20 / size, 4),
        "spot_check": check,
    }


def _spot_check(args: argparse.Namespace, out: Path, n: int) -> dict:
    """M on 64 random images against their Jacobians computed afresh (float32)."""
    from manifoldlens.data import load_dataset
    from manifoldlens.jacobian import jacobian
    from manifoldlens.models import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint, map_location=args.device)
    idx = np.sort(np.random.default_rng(0).choice(n, 64, replace=False))
    x = load_dataset(DATA, args.ooc_split).images[idx].to(args.device)
    j = jacobian(model, x, output="log_softmax", model_output=args.model_output)
    flat = j.reshape(64, -1).double().cpu()
    want = (flat @ flat.T).numpy()
    m = np.load(out, mmap_mode="r")
    got = np.asarray(m[np.ix_(idx, idx)], dtype=np.float64)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    return {"images": 64, "max_abs_err_over_max": float(f"{rel:.3g}"), "ok": rel < 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a seed001_cnn checkpoint (.json)")
    p.add_argument("--model-output", default="logits", help="what the model returns")
    p.add_argument("--n", type=int, default=10000, help="images for the comparison")
    p.add_argument("--split", default="test")
    p.add_argument("--processes", default="1,2", help="process counts to compare")
    p.add_argument("--modes", default="memory,file", help="memory, file or both")
    p.add_argument("--ooc-n", type=int, default=60000, help="images out of core")
    p.add_argument("--ooc-split", default="train")
    p.add_argument("--ooc-processes", type=int, default=2)
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="share of the tiles recorded when the first part is killed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--block-size", type=int, default=None,
                   help="rows per tile (default: jacobian_gram's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    common.add_device(p)
    p.add_argument("--workdir", default="/tmp/manifoldlens-bench-gram")
    p.add_argument("--keep", action="store_true", help="keep the matrices written")
    p.add_argument("--skip-ooc", action="store_true")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    p.add_argument("--report", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = {**common.run_metadata("bench/gram.py"), "device": args.device,
            "checkpoint": args.checkpoint, "batch_size": args.batch_size,
            "threads_per_process": args.threads, "loadavg_at_start": common.loadavg(),
            "workdir": str(work)}
    out: dict[str, object] = {"meta": meta}
    sections: dict[str, dict[str, object]] = {}
    meta["sections"] = sections
    if not args.skip_compare:
        out["compare"] = common.run_section(sections, "compare",
                                            lambda: bench_compare(args, work))
    if not args.skip_ooc:
        out["out_of_core"] = common.run_section(sections, "out_of_core",
                                                lambda: bench_out_of_core(args, work))
        if not args.keep:
            for p in work.glob(f"M_{args.ooc_n}.npy*"):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
    common.print_json(out, t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
