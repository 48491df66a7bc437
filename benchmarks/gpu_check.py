"""GPU check: the paper-scale throughput table, torch.compile on/off, and a short real training.

Run by ``benchmarks/gpu_check.sh`` (which installs the carried wheels first). Every step runs in
its own process under a time limit taken from one overall deadline, so the whole check ends in
time even when a step is slow; a step that fails or runs out of time is reported as such and the
others still run. Writes ``gpu_check.md`` and ``gpu_check.json`` (plus the throughput table) to
``--out``.

    python -m benchmarks.gpu_check --data-root ../shared/datasets --minutes 8
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import markdown_table
from scoring.engine.knn import faiss_available

REPO = Path(__file__).resolve().parent.parent
PAPER_EPOCHS = 1600


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets"))
    parser.add_argument("--c", dest="category", default="magnetic_tile")
    parser.add_argument("--config", default="wave50@256", help="arch@size of every step")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only to try the script")
    parser.add_argument("--minutes", type=float, default=8.0, help="overall time budget")
    parser.add_argument("--train-minutes", type=float, default=2.0, help="length of the real training")
    parser.add_argument("--throughput-epochs", type=int, default=6, help="timed epochs (+1 warm-up)")
    parser.add_argument("--loader-epochs", type=int, default=4,
                        help="epochs with --anomalies-on loader, to compare (0 = skip)")
    parser.add_argument("--matmul-epochs", type=int, default=4,
                        help="epochs with --dwt-impl matmul, to compare with the convolution (0 = skip)")
    parser.add_argument("--compile-epochs", type=int, default=8, help="epochs of the torch.compile run (0 = skip)")
    parser.add_argument("--work-dir", default="runs/gpu_check")
    parser.add_argument("--out", default="results/gpu_check")
    return parser


class Steps:
    """Runs commands against one deadline and keeps what each printed."""

    def __init__(self, minutes: float, log_path: Path):
        self.deadline = time.monotonic() + 60 * minutes
        self.log = log_path.open("w")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], reserve_s: float = 0.0) -> tuple[bool, float]:
        """Run ``cmd``; returns (finished ok, seconds). It gets the time left minus ``reserve_s``."""
        limit = self.left() - reserve_s
        print(f"[{name}] {limit:.0f} s left for it: {' '.join(cmd)}", flush=True)
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        if limit < 10:
            self.log.write("skipped: no time left\n")
            return False, 0.0
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            ok = proc.wait(timeout=limit) == 0
        except subprocess.TimeoutExpired:
            # Ctrl-C first: main.py then saves the last finished epoch, so what was trained can be scored.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            ok = False
            self.log.write(f"\nstopped after {limit:.0f} s (time budget)\n")
        seconds = time.monotonic() - start
        print(f"[{name}] {'ok' if ok else 'FAILED'} in {seconds:.0f} s", flush=True)
        self.log.flush()
        return ok, seconds


def epoch_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def throughput_step(args: argparse.Namespace, steps: Steps, info: dict, py: str, work: Path, out: Path) -> tuple:
    """1. The throughput table: real epochs, real scoring runs. Returns (train images/s, images per epoch)."""
    arch = args.config.split("@")[0]
    scoring = "torch,coreset" + (",faiss" if faiss_available() else "")
    ok, _ = steps.run("throughput", [py, "-m", "benchmarks.throughput", "--data-root", args.data_root, "--c",
                                     args.category, "--configs", args.config, "--device", args.device,
                                     "--epochs", str(args.throughput_epochs), "--scoring", scoring,
                                     "--work-dir", str(work / "throughput"), "--out", str(out)],
                      reserve_s=60 * (args.train_minutes + 1.5))
    table = out / f"throughput_{args.device}.json"
    info["throughput"] = json.loads(table.read_text()) if ok and table.is_file() else None
    train_ips = float(info["throughput"]["rows"][0]["train img/s"]) if info["throughput"] else None
    images_per_epoch = None
    run_log = epoch_log(work / "throughput" / args.config.replace("@", "_") / f"{args.category}-{arch}")
    if run_log:
        images_per_epoch = run_log[0]["images_per_s"] * run_log[0]["seconds"]
        train_ips = train_ips or statistics.median(r["images_per_s"] for r in run_log[1:] or run_log)
    info["train_images_per_s"] = train_ips
    if train_ips and images_per_epoch:
        info["projected_paper_run_min"] = round(PAPER_EPOCHS * images_per_epoch / train_ips / 60, 1)
    return train_ips, images_per_epoch


def training_step(args: argparse.Namespace, steps: Steps, info: dict, py: str, work: Path, train_ips: float,
                  images_per_epoch: float) -> None:
    """2. A real training at the paper's settings for --train-minutes, then both fusions."""
    arch, size = args.config.split("@")
    common = ["--c", args.category, "--data-root", args.data_root, "--device", args.device]
    # Less the start-up (decoding the images, cuDNN autotuning): about 30 s on the H200.
    epochs = max(1, int(train_ips * (60 * args.train_minutes - 30) / images_per_epoch))
    ckpt = work / "paper"
    ok, seconds = steps.run("training", [py, "main.py", *common, "--arch", arch, "--size", size, "--e", str(epochs),
                                         "--ckpt-dir", str(ckpt), "--no-tensorboard", "--save-every", "0",
                                         "--overwrite"],
                            reserve_s=75)
    log = epoch_log(ckpt / f"{args.category}-{arch}")
    info["training"] = {"epochs": epochs, "ok": ok, "wall_s": round(seconds, 1), "final": log[-1] if log else None}
    # A run stopped by the deadline saved its last epoch: score that (the table says how many).
    for fusion in ("concatenation", "multiplication"):
        res = work / "paper_results" / fusion
        ok, seconds = steps.run(fusion, [py, f"inference_{fusion}.py", *common, "--ckpt-dir", str(ckpt),
                                         "--p", f"{args.category}-{arch}", "--no-pictures", "--out", str(res),
                                         "--overwrite"],
                                reserve_s=15 if fusion == "concatenation" else 0)
        record = json.loads((res / "results.json").read_text()) if ok else None
        info["training"][fusion] = ({k: record["metrics"][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
                                    | {"s_per_test_image": record["timings"]["s_per_test_image"]}
                                    if record else "failed")


def variant_step(args: argparse.Namespace, steps: Steps, info: dict, py: str, work: Path, name: str,
                 flags: list[str], epochs: int, warmup: int = 1, reserve_s: float = 0.0) -> None:
    """A few epochs of the same training with ``flags``; images/s = median after ``warmup`` epochs."""
    if not (epochs and info.get("train_images_per_s")):
        return
    arch, size = args.config.split("@")
    ckpt = work / name
    ok, _ = steps.run(name, [py, "main.py", "--c", args.category, "--data-root", args.data_root, "--device",
                             args.device, "--arch", arch, "--size", size, "--e", str(epochs), *flags, "--ckpt-dir",
                             str(ckpt), "--no-tensorboard", "--save-every", "0", "--overwrite"],
                      reserve_s=reserve_s)
    log = epoch_log(ckpt / f"{args.category}-{arch}")
    timed = [r["images_per_s"] for r in log[warmup:]]
    info[name] = {"ok": ok, "images_per_s": statistics.median(timed) if timed else None,
                  "epochs": [r["images_per_s"] for r in log]}


def main(args: argparse.Namespace) -> None:
    import torch

    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.minutes, out / "gpu_check_log.txt")
    info = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "config": args.config}
    print(info, flush=True)
    py = sys.executable
    train_ips, images_per_epoch = throughput_step(args, steps, info, py, work, out)
    if train_ips and images_per_epoch:
        training_step(args, steps, info, py, work, train_ips, images_per_epoch)
    # 3. Anomalies made one image at a time by loader workers (the CPU path) instead of on the GPU.
    variant_step(args, steps, info, py, work, "loader", ["--anomalies-on", "loader"], args.loader_epochs,
                 reserve_s=60)
    # 4. The wavelet layer as matrix products (channels_last layout kept) instead of the depthwise
    #    convolution: the suspect of the 2026-11-28 run's low bf16 gain.
    variant_step(args, steps, info, py, work, "dwt_matmul", ["--dwt-impl", "matmul"], args.matmul_epochs,
                 reserve_s=30)
    # 5. torch.compile (last: it is the optional part, and compiling takes a while).
    variant_step(args, steps, info, py, work, "compile", ["--compile"], args.compile_epochs, warmup=2)

    (out / "gpu_check.json").write_text(json.dumps(info, indent=2))
    (out / "gpu_check.md").write_text(summary_markdown(info))
    print((out / "gpu_check.md").read_text())


def summary_markdown(info: dict) -> str:
    lines = [f"# GPU check, {info['date']}: {info['device']} (torch {info['torch']}), {info['config']}", ""]
    if info.get("throughput"):
        rows = info["throughput"]["rows"]
        lines += [markdown_table(list(rows[0]), [list(r.values()) for r in rows]), ""]
    else:
        lines += ["throughput step failed (see gpu_check_log.txt)", ""]
    if info.get("projected_paper_run_min"):
        lines.append(f"- training {info['train_images_per_s']:.0f} images/s -> the paper's {PAPER_EPOCHS} epochs of "
                     f"this category: {info['projected_paper_run_min']} min")
    if "loader" in info:
        lines.append(f"- anomalies made by loader workers instead of on the GPU: {info['loader']['images_per_s']} "
                     f"images/s (epochs: {info['loader']['epochs']})")
    if "dwt_matmul" in info:
        lines.append(f"- wavelet layer as matrix products (--dwt-impl matmul): {info['dwt_matmul']['images_per_s']} "
                     f"images/s (epochs: {info['dwt_matmul']['epochs']})")
    if "compile" in info:
        compiled = info["compile"]
        lines.append(f"- with --compile: {compiled['images_per_s']} images/s (epochs: {compiled['epochs']})")
    if "training" in info:
        t = info["training"]
        lines.append(f"- real training, paper settings: {t['epochs']} epochs in {t['wall_s']} s (process wall time), "
                     f"last epoch {t['final']}")
        for fusion in ("concatenation", "multiplication"):
            lines.append(f"  - {fusion}: {t.get(fusion)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(get_args_parser().parse_args())
