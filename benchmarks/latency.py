"""Deployment latency: milliseconds per image of ``Detector.predict``, the TorchScript and the ONNX file.

For each arch and bank (exact, ``--coreset 0.1``, ``0.01``) a detector is built from
``--train-images`` synthetic training images (an untrained network: timing does not depend on
the weights; 209 images is MVTec AD bottle's training set), saved, exported, and each form is
timed in a process of its own (so its peak RSS is its own): p50 / p95 ms per image at batch 1
over ``--repeats`` calls after a warm-up, images/s at batch ``--batch``, and for ``predict`` where
the time goes (network features vs k-NN + fusion). The forms take turns ``--rounds`` times (a
shared host drifts by tens of percent within minutes): the table gives medians over rounds, each
round's p50 range, and each exported form's time over ``predict``'s of the same round. Inputs are
uint8 ``S x S`` RGB arrays, so file decoding is not counted.

    python -m benchmarks.latency                                 # wave18 and wave50 at 256 px
    python -m benchmarks.latency --archs wave18 --coresets 0.1   # the inspection-line target
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import models
from benchmarks.common import markdown_table, system_info, write_results
from benchmarks.latency_child import synthetic_images
from scoring import Detector, ScoreConfig
from scoring.engine.calibration import Threshold
from scoring.engine.features import batched_features
from scoring.engine.model import AnomalyModel, AnomalyScorer, bank_states
from scoring.export import export

FORMS = ("predict", "torchscript", "onnx")
# Times one form in a process of its own (python -m benchmarks.latency_child, from the repository
# root), importing only what that form needs.
REPO = Path(__file__).resolve().parent.parent
SUFFIX = {"predict": "detector.pt", "torchscript": "ts", "onnx": "onnx"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--archs", default="wave18,wave50")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=209, help="images in the memory bank")
    parser.add_argument("--coresets", default="1.0,0.1,0.01", help="bank fractions (1.0 = exact bank)")
    parser.add_argument("--uncertified", action="store_true",
                        help="also time each coreset with the fixed, uncertified re-search (the old --refine 16)")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls (fewer when slow)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="time limit of one form's batch-1 timing")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the throughput row")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every form is timed, in turn, each in a fresh process (medians reported)")
    parser.add_argument("--out", default="results/benchmarks")
    return parser


def build_detectors(arch: str, args, work: Path) -> dict[str, Path]:
    """One detector file per bank (coreset fraction; with ``--uncertified`` also each coreset's
    fixed re-search of its ``refine`` highest patches), banks from the synthetic training images."""
    torch.manual_seed(0)
    model = models.create_model(arch).eval().to(memory_format=torch.channels_last)
    base = ScoreConfig(size=args.size, batch_size=16)
    provenance = {"arch": arch, "wavelet": models.DEFAULT_WAVELET, "num_classes": 3, "note": "untrained, timing only"}
    train = torch.from_numpy(synthetic_images(args.train_images, args.size, seed=1)).permute(0, 3, 1, 2).float() / 255
    feats = batched_features(model, train, list(base.layers), base.batch_size, torch.device("cpu"))
    files = {}
    for fraction in [float(c) for c in args.coresets.split(",")]:
        config = base.replace(coreset=fraction)
        states = bank_states(config, feats)  # one coreset for both ways of re-searching it
        kinds = {"exact": config} if fraction >= 1 else {f"coreset {fraction:g}": config}
        if fraction < 1 and args.uncertified:
            kinds[f"coreset {fraction:g} uncertified"] = config.replace(certify=False)
        for bank, kind_config in kinds.items():
            scorer = AnomalyScorer.from_states(kind_config, states)
            detector = Detector(AnomalyModel(model, scorer, kind_config), Threshold(1.0, "benchmark"), provenance)
            # No dots in the stem: with_suffix would cut "0.1" to "0" (and 0.1 and 0.01 would share a file).
            stem = work / f"{arch}-{bank.replace(' ', '_').replace('.', 'p')}"
            files[bank] = detector.save(stem.with_suffix(".detector.pt"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for form in ("torchscript", "onnx"):
                    if form in args.forms:
                        export(detector, form, stem.with_suffix("." + SUFFIX[form]))
    return files


def timed_rounds(files: dict[str, Path], forms: list[str], rounds: int, passthrough: list[str]) -> dict:
    """``{(bank, form): [one child's JSON result per round]}``: every form of a bank timed in turn,
    ``rounds`` times, each time in a fresh process, so a host's drift falls on every form alike."""
    results: dict = {}
    for bank, detector_file in files.items():
        for _ in tqdm(range(rounds), desc=f"{bank}: rounds of {','.join(forms)}", leave=False):
            for form in forms:
                path = detector_file if form == "predict" else detector_file.with_name(
                    detector_file.name.replace("detector.pt", SUFFIX[form]))
                run = subprocess.run([sys.executable, "-m", "benchmarks.latency_child", form, str(path),
                                      *passthrough], capture_output=True, text=True, cwd=REPO)
                if run.returncode != 0:
                    print(run.stderr[-2000:], file=sys.stderr)
                    continue
                result = json.loads(run.stdout.strip().splitlines()[-1])
                results.setdefault((bank, form), []).append({**result, "file_mb": path.stat().st_size / 2**20})
    return results


def summary_row(arch: str, bank: str, form: str, runs: list[dict], predict_runs: list[dict] | None) -> list[str]:
    """One table row: medians over rounds; ``x predict`` (an export's p50 over ``predict``'s) and ``x
    features`` (``predict``'s p50 over its network's, timed in turn) are medians of each round's ratio."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    p50s = [r["p50_ms"] for r in runs]
    spread = f"{min(p50s):.0f}-{max(p50s):.0f}" if len(p50s) > 1 else ""
    ratio, over_features = "", ""
    if predict_runs and form != "predict":
        ratio = f"{statistics.median(r['p50_ms'] / p['p50_ms'] for r, p in zip(runs, predict_runs)):.2f}"
    if "features_ms" in runs[0]:
        over_features = f"{statistics.median(r['p50_ms'] / r['features_ms'] for r in runs):.2f}"
    return [arch, bank, form, f"{median('p50_ms'):.0f}", spread, ratio, over_features, f"{median('p95_ms'):.0f}",
            f"{median('batch_images_per_s'):.1f}",
            f"{median('features_ms'):.0f}" if "features_ms" in runs[0] else "",
            f"{median('knn_ms'):.0f}" if "knn_ms" in runs[0] else "",
            f"{runs[0]['file_mb']:.0f}", f"{max(r['peak_rss_mb'] for r in runs):.0f}"]


def main(args: argparse.Namespace) -> None:
    header = ["arch", "bank", "form", "p50 ms", "p50 by round", "x predict", "x features", "p95 ms",
              f"img/s @{args.batch}", "features ms", "k-NN ms", "file MB", "peak RSS MB"]
    rows = []
    passthrough = ["--size", str(args.size), "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
                   "--batch", str(args.batch)]
    forms = args.forms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            print(f"{arch}: building banks from {args.train_images} images at {args.size} px ...", flush=True)
            files = build_detectors(arch, args, Path(tmp))
            results = timed_rounds(files, forms, args.rounds, passthrough)
            for bank in files:
                for form in forms:
                    if (bank, form) in results:
                        rows.append(summary_row(arch, bank, form, results[bank, form], results.get((bank, "predict"))))
                        print(markdown_table(header, rows[-1:]).splitlines()[-1], flush=True)
    info = {**system_info(torch.device("cpu")), "size": args.size, "train_images": args.train_images,
            "rounds": args.rounds, "inputs": "uint8 S x S RGB arrays (no decoding)", "command": " ".join(sys.argv)}
    print()
    print(markdown_table(header, rows))
    print("written:", write_results(args.out, "latency", header, rows, info))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
