"""Greedy k-center coreset build at scale: time and peak memory against bank rows, one process or
a bank sharded over several (gloo, as under ``torchrun ... --shard-bank``).

Each measurement runs in fresh processes (peak RSS is theirs alone) on synthetic patch features
(clustered, non-negative, like pooled ReLU features; generated in blocks seeded by their index, so
a rank makes only its own part). The build is :func:`scoring.engine.coreset.greedy_coreset` with the scoring
defaults (random projection to ``--proj-dim``, fraction ``--fraction``). With ``--processes N``
the bank is split over N processes and the chosen rows are checked against a one-process build of
the same bank when ``--check`` is given (the same indices, in the same order). With ``--compare``
the direct loop (:func:`scoring.engine.coreset.greedy_coreset_direct`, one pass over every row per
centre: the sampler before 2026-12-05, what a GPU runs) builds the same coreset too, and the table
gives its time and how many rows the two share, in the same place and in all.

    python -m benchmarks.coreset_scale --rows 50000,200000,1000000
    python -m benchmarks.coreset_scale --rows 200000 --compare
    python -m benchmarks.coreset_scale --rows 200000 --processes 2 --check
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

from benchmarks.common import markdown_table, system_info, write_results

BLOCK_ROWS = 65536
CLUSTERS = 64


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="50000,200000,1000000", help="bank sizes, a comma list")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension (wave18's concatenation: 384)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--proj-dim", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="compare the indices with a one-process build")
    parser.add_argument("--compare", action="store_true",
                        help="also build with the direct loop (one pass over the bank per centre) and compare")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def synthetic_rows(start: int, stop: int, dim: int) -> torch.Tensor:
    """Rows ``start:stop`` of the synthetic bank ``(stop - start, dim)``: each block of
    :data:`BLOCK_ROWS` rows has its own seed, so any range is made alone and the same way."""
    centres = torch.randn(CLUSTERS, dim, generator=torch.Generator().manual_seed(12345)).abs() * 2
    parts = []
    for block in range(start // BLOCK_ROWS, math.ceil(stop / BLOCK_ROWS)):
        gen = torch.Generator().manual_seed(block)
        first = block * BLOCK_ROWS
        rows = centres[torch.randint(0, CLUSTERS, (BLOCK_ROWS,), generator=gen)]
        rows = (rows + torch.randn(BLOCK_ROWS, dim, generator=gen)).relu_()
        parts.append(rows[max(0, start - first):stop - first])
    return torch.cat(parts)


def worker(rank: int, world: int, port: int, rows: int, args: argparse.Namespace, queue) -> None:
    """Build this rank's part of the coreset; put (rank, seconds, peak RSS MB, indices) on ``queue``."""
    from common.distributed import DistInfo, block
    from scoring.engine.coreset import greedy_coreset, greedy_coreset_direct

    shards = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.distributed.init_process_group("gloo")
        shards = DistInfo(rank, world)
    share = block(rows, shards or DistInfo())
    bank = synthetic_rows(share.start, share.stop, args.dim)
    start = time.perf_counter()
    build_fn = greedy_coreset_direct if args.direct else greedy_coreset
    chosen = build_fn(bank, args.fraction, seed=0, proj_dim=args.proj_dim, progress=rank == 0, shards=shards)
    seconds = time.perf_counter() - start
    # As a NumPy array: a tensor would travel through shared memory, gone once this process ends.
    queue.put((rank, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, chosen.numpy()))
    if shards is not None:
        torch.distributed.destroy_process_group()


def build(rows: int, processes: int, args: argparse.Namespace,
          direct: bool = False) -> tuple[float, float, torch.Tensor]:
    """Seconds (the slowest rank), peak RSS per process (MB, the largest) and the chosen indices
    (``direct``: by the direct loop)."""
    args = argparse.Namespace(**{**vars(args), "direct": direct})
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the cores shared out, as torchrun does
    procs = [context.Process(target=worker, args=(r, processes, port, rows, args, queue)) for r in range(processes)]
    for p in procs:
        p.start()
    results = sorted(queue.get() for _ in procs)
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit("a build process failed: see its output")
    return max(r[1] for r in results), max(r[2] for r in results), torch.from_numpy(results[0][3])


def main(args: argparse.Namespace) -> None:
    header = ["bank rows", "dim", "centres", "processes", "build s", "centres / s", "peak RSS MB / process",
              "bank MB", "same indices as one process", "direct loop s",
              "same rows as the direct loop: in place / in all"]
    table = []
    for rows in [int(r) for r in args.rows.split(",")]:
        seconds, rss, chosen = build(rows, args.processes, args)
        same = "-"
        if args.check and args.processes > 1:
            same = "yes" if torch.equal(build(rows, 1, args)[2], chosen) else "NO"
        direct_s, shared = "-", "-"
        if args.compare:
            direct_s, _, reference = build(rows, 1, args, direct=True)
            direct_s = f"{direct_s:.1f}"
            shared = (f"{int((reference == chosen).sum())} / "
                      f"{len(set(reference.tolist()) & set(chosen.tolist()))} of {len(chosen)}")
        table.append([rows, args.dim, len(chosen), args.processes, f"{seconds:.1f}", f"{len(chosen) / seconds:.0f}",
                      f"{rss:.0f}", f"{rows * args.dim * 4 / 2**20:.0f}", same, direct_s, shared])
        print(markdown_table(header, table[-1:]), flush=True)
    print(markdown_table(header, table))
    info = {**system_info(torch.device("cpu")), "fraction": args.fraction, "proj_dim": args.proj_dim,
            "command": " ".join(sys.argv)}
    print("written:", write_results(args.out, f"coreset_scale_p{args.processes}", header, table, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
