"""Export a saved detector as one self-contained file for deployment (TorchScript or ONNX).

    python inference_concatenation.py --c pill --data-root demo_data --save-detector pill.detector.pt
    python export.py --detector pill.detector.pt --format onnx --out pill.onnx
    python export.py --detector pill.detector.pt --format torchscript --out pill.ts

The file takes raw uint8 images ``(N, H, W, 3)`` or ``(N, H, W, 1)`` (TorchScript also
``(N, H, W)``) and returns ``scores`` ``(N,)`` and ``maps`` ``(N, H, W)`` (the frame); resizing and scaling
are inside. The threshold and the settings are stored beside the graph (see README "Export and
deployment"). After writing, the file is run once on a few images and compared with
``Detector.predict``; the differences are printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from common import cli
from common.errors import UserError
from scoring import Detector
from scoring.export import FORMATS, export, run_exported

SUFFIXES = {"torchscript": "ts", "onnx": "onnx"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Export a detector file (--save-detector) to TorchScript or ONNX.",
                                formatter_class=cli.DefaultsHelpFormatter)
    parser.add_argument("--detector", required=True, help="detector file written by --save-detector / Detector.save")
    parser.add_argument("--format", required=True, choices=FORMATS, help="torchscript (needs only torch) or onnx "
                                                                        "(needs only onnxruntime and NumPy)")
    parser.add_argument("--out", required=True, help="file to write (.ts / .onnx)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser


def parity_images(size: int, count: int = 3) -> np.ndarray:
    """Smooth random uint8 images ``(count, H, W, 3)`` of another size than ``size`` (the resize is checked too)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (count, 9, 11, 3)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=(size + 13, size + 5),
                                          mode="bilinear", align_corners=False)
    return big.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def main(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / f'detector.{SUFFIXES[args.format]}'}")
    if out.exists() and Path(args.detector).exists() and out.resolve() == Path(args.detector).resolve():
        raise UserError(f"--out {out} is the --detector file itself; choose another --out")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it or choose another --out")
    detector = Detector.load(args.detector, device="cpu")
    # Written and checked beside --out first: a file that fails its check never takes --out's place.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints in the graph are expected
            staged = export(detector, args.format, Path(work) / out.name)
        message = check_exported(detector, staged, args.format)
        size_mb = sum(p.stat().st_size for p in Path(work).iterdir()) / 2**20
        for part in Path(work).iterdir():  # the graph, and an ONNX file's external weights beside it
            os.replace(part, out.parent / part.name)
    print(f"wrote {out} ({size_mb:.1f} MB, {args.format}); threshold {detector.threshold} stored beside the graph")
    print(message)
    return out


def check_exported(detector: Detector, path: Path, fmt: str) -> str:
    """The exported file against ``Detector.predict`` on a few images: the line to print, or a
    ``UserError`` when it scores differently (or cannot run)."""
    images = parity_images(detector.size)
    expected = detector.predict(list(images))
    try:
        scores, maps, *certified = run_exported(path, fmt, images)
    except Exception as exc:  # noqa: BLE001 - the runtime's own error, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise UserError(f"the exported {fmt} file does not run ({first}); nothing was written, please report this "
                        "with the detector file") from None
    # Only certified scores are the exact bank's (a file runs a fixed number of re-search rounds).
    checked = certified[0] if certified else np.ones(len(scores), bool)
    # Relative to the score, or to the threshold for scores below it (see README "Export and deployment").
    scale = np.maximum(np.abs(expected.scores), detector.threshold or 1e-12)
    score_diff = float(np.max(np.abs(scores - expected.scores)[checked] / scale[checked], initial=0.0))
    map_diff = float(np.max(np.abs(maps - expected.maps) / np.maximum(1.0, np.abs(expected.maps))))
    if not (score_diff <= 1e-4 and map_diff <= 1e-3):  # NaN fails too
        raise UserError(f"the exported file scores differently from the detector (scores {score_diff:.1e}, maps "
                        f"{map_diff:.1e}); nothing was written, please report this with the detector file")
    return (f"check on {len(images)} images against Detector.predict: scores within {score_diff:.1e} relative, "
            f"maps within {map_diff:.1e}" + (f"; {int(checked.sum())} of {len(scores)} image scores certified exact "
                                            "(third output 'certified')" if certified else ""))


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
