"""Throughput benchmark: real training epochs and real scoring runs, one table.

For every ``arch@size`` it measures, each in its own process so memory peaks are its own:

- training images/s: real epochs of ``main.py`` on the data (every normal and synthetic image
  counted, data pipeline included), median of the epochs after the first (warm-up);
- scoring: seconds and images/s per test image with the exact bank (faiss and torch k-NN) and
  with ``--coreset 0.1``; memory-bank build time; peak host RSS (and GPU memory on CUDA);
- with ``--paper-baseline`` (CPU), the same epochs run the paper code's way
  (``paper_style_train.py``: float32, images decoded per sample, wavelet matrices rebuilt per
  call, a host synchronisation per step), side by side, and the table gives the ratio.

    python -m benchmarks.throughput                                     # CPU, wave18@128 on Magnetic Tile
    python -m benchmarks.throughput --configs wave18@128 --device cpu --paper-baseline
    python -m benchmarks.throughput --configs wave50@256 --device cuda --epochs 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import markdown_table, write_results
from common.runtime import PRECISIONS

REPO = Path(__file__).resolve().parent.parent

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--c", dest="category", default="magnetic_tile")
    parser.add_argument("--configs", default="wave18@128", help="comma list of arch@size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="training precision (scoring features stay fp32 unless --score-precision)")
    parser.add_argument("--score-precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--b", dest="batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs + 1 warm-up")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--scoring", default="faiss,torch,coreset",
                        help="scoring runs: faiss, torch (exact banks), coreset (0.1, auto backend); "
                             "'none' for training only")
    parser.add_argument("--paper-baseline", action="store_true",
                        help="also time the same epochs the paper code's way (CPU, float32; "
                             "benchmarks/paper_style_train.py) and report the speed-up")
    parser.add_argument("--baseline-workers", type=int, default=2,
                        help="DataLoader workers of the paper-style run (the paper code asks for 24; "
                             "on 2 cores 2 is its faster setting)")
    parser.add_argument("--work-dir", default="runs/throughput")
    parser.add_argument("--out", default="results/benchmarks")
    parser.add_argument("--extra-train", default="", help="extra main.py flags, e.g. '--no-channels-last'")
    return parser


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")


def train_throughput(args, arch: str, size: int, ckpt_dir: Path) -> tuple[float, list[float]]:
    run([sys.executable, "main.py", "--c", args.category, "--data-root", args.data_root, "--arch", arch,
         "--size", str(size), "--e", str(args.epochs + 1), "--b", str(args.batch_size), "--device", args.device,
         "--precision", args.precision, "--workers", str(args.workers), "--ckpt-dir", str(ckpt_dir),
         "--no-tensorboard", "--save-every", "0", "--overwrite", *args.extra_train.split()])
    log = [json.loads(line) for line in (ckpt_dir / f"{args.category}-{arch}" / "log.jsonl").read_text().splitlines()]
    timed = [r["images_per_s"] for r in log[1:]] or [log[-1]["images_per_s"]]
    return statistics.median(timed), timed


def paper_style_throughput(args, arch: str, size: int) -> float:
    out = Path(args.work_dir) / f"paper_style_{arch}_{size}"
    run([sys.executable, "-m", "benchmarks.paper_style_train", "--data-root", args.data_root, "--c", args.category,
         "--arch", arch, "--size", str(size), "--b", str(args.batch_size), "--epochs", str(args.epochs),
         "--workers", str(args.baseline_workers), "--out", str(out)])
    rows = json.loads((out / "paper_style_train.json").read_text())["rows"]
    return float(rows[0]["train img/s (median)"])


def score_run(args, arch: str, ckpt_dir: Path, name: str) -> dict:
    out = Path(args.work_dir) / "scores" / f"{arch}-{name}"
    flags = {"faiss": ["--knn", "faiss"], "torch": ["--knn", "torch"], "coreset": ["--coreset", "0.1"]}[name]
    run([sys.executable, "inference_concatenation.py", "--c", args.category, "--data-root", args.data_root,
         "--ckpt-dir", str(ckpt_dir), "--p", f"{args.category}-{arch}", "--out", str(out), "--overwrite",
         "--no-pictures", "--device", args.device, "--precision", args.score_precision, "--rebuild-bank", *flags])
    return json.loads((out / "results.json").read_text())


def main(args: argparse.Namespace) -> None:
    if args.paper_baseline and args.device != "cpu":
        raise SystemExit("--paper-baseline: the paper-style stand-in runs on the CPU only; add --device cpu")
    header = ["config", "device", "train img/s", "paper-style train img/s", "train speed-up", "scoring",
              "bank build s", "s / test image", "test img/s", "image AUROC", "pixel AUROC", "peak RSS MB", "GPU max MB"]
    rows = []
    for config in args.configs.split(","):
        arch, size = config.split("@")
        ckpt_dir = Path(args.work_dir) / config.replace("@", "_")
        ips, epochs = train_throughput(args, arch, int(size), ckpt_dir)
        print(f"{config}: training {ips:.1f} img/s (epochs: {epochs})", flush=True)
        baseline = paper_style_throughput(args, arch, int(size)) if args.paper_baseline else None
        side = [f"{baseline:.1f}", f"{ips / baseline:.2f}x"] if baseline else ["-", "-"]
        if baseline:
            print(f"{config}: paper-style {baseline:.1f} img/s, ours {ips / baseline:.2f}x", flush=True)
        names = [n for n in args.scoring.split(",") if n and n != "none"]
        if not names:
            rows.append([config, args.device, f"{ips:.1f}", *side] + ["-"] * (len(header) - 5))
        for name in names:
            record = score_run(args, arch, ckpt_dir, name)
            per_image = record["timings"]["s_per_test_image"]
            rows.append([config, args.device, f"{ips:.1f}", *side, name, f"{record['timings']['bank_s']:.1f}",
                         f"{per_image:.4f}", f"{1 / per_image:.1f}",
                         f"{record['metrics']['image_auroc']:.4f}", f"{record['metrics']['pixel_auroc']:.4f}",
                         record["memory"]["peak_rss_mb"], record["memory"].get("cuda_max_allocated_mb", "-")])
            print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)
    print(markdown_table(header, rows))
    info = {"command": " ".join(sys.argv), "batch": args.batch_size, "epochs_timed": args.epochs,
            "precision": args.precision, "category": args.category}
    print("written:", write_results(args.out, f"throughput_{args.device}", header, rows, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
