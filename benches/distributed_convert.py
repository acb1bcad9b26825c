"""Conversion across ranks: ``quantsave.convert`` on one process against the same call on 2
ranks (``torch.multiprocessing``, gloo, this machine's cores split between them), each timed
inside the process from the call to its return after a warm-up conversion (process start and
imports excluded), medians of several runs. Also one process limited to one thread
(``QUANTSAVE_NUM_THREADS=1``, the share each rank gets): the 2-rank speedup over it is the
scaling of the data path when each rank has a core of its own. The output folders are checked
byte-identical (by sha256; each folder is deleted and the dirty pages flushed before the next
timed call, so no run pays for another's memory or writeback). ``--dir`` on a tmpfs
(``/dev/shm``) takes the disk out of the measurement.

Also the data path on its own (``SaveResult.timings``: the double-quant pass and the pass that
reads, quantizes and writes the tensors; for the ranks, the slowest rank's of each, the two
passes being separated by an exchange): what splits across ranks, without the planning every
rank repeats and the commit.

Builds a bf16 Llama-shaped checkpoint (hidden 2048, the layers given) in 1 GB shards.

Usage: python benches/distributed_convert.py [--layers 8] [--runs 3] [--dir /tmp/qs-dist] [--config nf4-dq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

CONFIGS = {
    "nf4-dq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
}  # fmt: skip


def build(folder: Path, layers: int) -> None:
    import transformers

    if (folder / "config.json").is_file():
        return
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")


def _rank(rank: int, world: int, port: int, src: str, dst: str, config: str, out: str) -> None:
    import torch.distributed as dist

    import quantsave

    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 (see main)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    # A first conversion pays the imports and caches, as the one-process run's warm-up does.
    warm = Path(dst).parent / f"warm-{world}"
    quantsave.convert(src, warm, CONFIGS[config], max_shard_size="200MB")
    if rank == 0:
        _settle(warm)
    dist.barrier()
    t0 = time.perf_counter()
    result = quantsave.convert(src, dst, CONFIGS[config], max_shard_size="200MB")
    seconds = time.perf_counter() - t0
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, **result.timings}))
    dist.destroy_process_group()


def _settle(folder: Path) -> None:
    """Deletes a written folder and flushes the page cache's dirty pages, so every timed run
    starts from the same memory and disk state (none pays for an earlier one's writeback)."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


def _digest(folder: Path) -> dict[str, str]:
    """The folder's files by sha256, then the folder settled (see ``_settle``)."""
    from quantsave import _core

    files = sorted(folder.iterdir())
    digests = dict(zip([f.name for f in files], _core.sha256_files([str(f) for f in files]), strict=True))
    _settle(folder)
    return digests


def _independent(rank: int, world: int, src: str, dst: str, config: str, out: str) -> None:
    """One of ``world`` processes converting the whole checkpoint on its own (no process group),
    all at once: what this machine gives processes that share nothing but its cores and disk."""
    import quantsave

    torch.set_num_threads(1)
    quantsave.convert(src, f"{dst}-warm-{rank}", CONFIGS[config], max_shard_size="200MB")
    _settle(Path(f"{dst}-warm-{rank}"))
    Path(f"{out}.ready.{rank}").touch()
    while not all(Path(f"{out}.ready.{r}").exists() for r in range(world)):
        time.sleep(0.001)
    t0 = time.perf_counter()
    result = quantsave.convert(src, f"{dst}-{rank}", CONFIGS[config], max_shard_size="200MB")
    seconds = time.perf_counter() - t0
    Path(f"{out}.{rank}").write_text(json.dumps({"seconds": seconds, **result.timings}))


def independent(world: int, src: Path, dst: Path, config: str) -> tuple[float, float]:
    """The slowest of ``world`` independent one-thread conversions run at once (whole call, data path)."""
    out = dst.parent / "seconds-independent"
    for r in range(world):
        Path(f"{out}.ready.{r}").unlink(missing_ok=True)
    os.environ["QUANTSAVE_NUM_THREADS"] = "1"
    mp.start_processes(_independent, args=(world, str(src), str(dst), config, str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    procs = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    return max(p["seconds"] for p in procs), max(_data_path(p) for p in procs)


def _data_path(timings: dict[str, float]) -> float:
    return timings.get("offsets", 0.0) + timings.get("write", 0.0)


def run(world: int, src: Path, dst: Path, config: str, threads: int | None = None) -> tuple[float, float]:
    """Seconds of one conversion and of its data path: in this process (``world`` 1,
    ``threads`` None) or in ``world`` spawned ranks (``threads`` each; default the cores split
    between them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = dst.parent / f"seconds-{world}.txt"
    if world == 1 and threads is None:
        import quantsave

        quantsave.convert(src, dst.parent / "warm", CONFIGS[config], max_shard_size="200MB")  # imports, caches
        _settle(dst.parent / "warm")
        t0 = time.perf_counter()
        result = quantsave.convert(src, dst, CONFIGS[config], max_shard_size="200MB")
        return time.perf_counter() - t0, _data_path(result.timings)
    # Each rank gets its share of the cores (the one process uses them all).
    os.environ["QUANTSAVE_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // world))
    mp.start_processes(_rank, args=(world, port, str(src), str(dst), config, str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    data = max(t.get("offsets", 0.0) for t in ranks) + max(t.get("write", 0.0) for t in ranks)
    return ranks[0]["seconds"], data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/qs-dist")
    ap.add_argument("--config", choices=list(CONFIGS), default="nf4-dq")
    args = ap.parse_args()
    # torch's own thread pool at one thread in every process, as torchrun sets OMP_NUM_THREADS=1
    # for its workers: otherwise each rank's idle OpenMP threads spin on the cores the other rank
    # computes on (measured: the ranks' double-quant pass twice as slow), and the double-quant
    # offsets (torch's float32 mean, which depends on the thread count) would differ between
    # the one-process run and the ranks. The Rust threads are set apart (QUANTSAVE_NUM_THREADS).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    root = Path(args.dir)
    src = root / f"llama-{args.layers}"
    build(src, args.layers)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    variants = {"1 process": (1, "out-1", None), "1 process, 1 thread": (1, "out-1t", 1), "2 ranks": (2, "out-2", None)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    data: dict[str, list[float]] = {k: [] for k in variants}
    both: tuple[list[float], list[float]] = ([], [])  # 2 independent whole conversions at once
    outputs: list[dict[str, str]] = []  # every output folder's files by sha256
    for _ in range(args.runs):
        for name, (world, folder, threads) in variants.items():
            seconds, data_seconds = run(world, src, root / folder, args.config, threads)
            times[name].append(seconds)
            data[name].append(data_seconds)
            outputs.append(_digest(root / folder))
        seconds, data_seconds = independent(2, src, root / "out-ind", args.config)
        both[0].append(seconds)
        both[1].append(data_seconds)
        outputs.extend(_digest(root / f"out-ind-{r}") for r in range(2))
    same = all(o == outputs[0] for o in outputs)
    print(f"{size / 1e9:.2f} GB bf16 checkpoint, {args.config}, {os.cpu_count()} CPUs, {root}, medians of {args.runs}")
    for label, seconds, alone in (("whole call", times, both[0]), ("data path", data, both[1])):
        med = {k: statistics.median(v) for k, v in seconds.items()}
        two, one = med["2 ranks"], med["1 process, 1 thread"]
        print(f"{label}: " + "   ".join(f"{k}: {v:.2f} s" for k, v in med.items()))
        print(f"  2 ranks against 1 process: {med['1 process'] / two:.2f}x; against 1 process on one thread (each "
              f"rank's share): {one / two:.2f}x (target ~2x)")  # fmt: skip
        # Two processes converting the whole checkpoint each, at once, do twice the work: the
        # speedup this machine allows two processes is 2 x one thread's time / their time.
        print(f"  2 independent one-thread conversions at once: {statistics.median(alone):.2f} s, so this machine "
              f"scales two processes {2 * one / statistics.median(alone):.2f}x")  # fmt: skip
    print(f"outputs byte-identical: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
