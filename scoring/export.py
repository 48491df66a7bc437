"""Export a :class:`scoring.Detector` as one self-contained file: TorchScript or ONNX.

The file *is* the detector's scoring module: :class:`scoring.engine.model.ExportModel` (the
:class:`scoring.engine.model.AnomalyModel` that ``Detector.predict`` runs, with the uint8 preprocessing
in front), traced. It takes the raw uint8 image batch ``(N, H, W, C)`` (``C`` = 1, 3 or 4;
TorchScript also ``(N, H, W)``) and returns ``scores`` ``(N,)`` and ``maps`` ``(N, H, W)`` float32 at the
detector's frame.
This module only writes and reads files: the threshold is not in the graph but stored beside it
(TorchScript ``_extra_files``, ONNX metadata ``threshold``), with the settings, so a deployment
can change it without re-exporting.

Decoding (file formats, EXIF orientation, 16-bit scaling, box-reducing huge images) stays
outside: give the graph the 8-bit pixels as a viewer shows them.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError

from .detector import Detector
from .engine.model import AnyRank, AnyRankCertified, ExportModel

FORMATS = ("torchscript", "onnx")


def metadata(detector: Detector) -> dict:
    """What travels beside the graph: threshold, input contract, settings, provenance."""
    return {"threshold": detector.threshold,
            "threshold_source": None if detector.calibration is None else detector.calibration.source,
            "input": "uint8 (N, H, W, C), C = 1, 3 or 4 (alpha dropped) (TorchScript: also (N, H, W)); RGB order",
            "outputs": "scores (N,) float32; maps (N, H, W) float32 at the frame; verdict = score > threshold"
                       + ("; certified (N,) bool: the score equals the exact bank's" if reports_certified(detector)
                          else ""),
            "size": detector.size, "frame": list(detector.frame), "config": detector.config.to_dict(),
            "provenance": detector.provenance}


def reports_certified(detector: Detector) -> bool:
    """Whether the exported file has the third output ``certified`` (a coreset with certified scores)."""
    scorer = detector.model.scorer
    return scorer.coreset and scorer.certify_scores


def example_input(detector: Detector, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    height, width = detector.frame
    return torch.randint(0, 256, (batch, height + 7, width + 3, 3), dtype=torch.uint8, generator=gen)


@torch.no_grad()
def export_torchscript(detector: Detector, out: Path) -> Path:
    core = ExportModel(detector.model)
    # Traced on one image with a scratch input: the scripted front calls it image by image.
    elements = core.scratch_elements()
    traced = torch.jit.trace(core, (example_input(detector, batch=1), torch.empty(elements)), check_trace=False)
    scripted = torch.jit.script((AnyRankCertified if core.reports_certified else AnyRank)(traced, elements))
    extra = {"metadata.json": json.dumps(metadata(detector))}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        tmp = Path(work) / out.name
        torch.jit.save(scripted, str(tmp), _extra_files=extra)
        os.replace(tmp, out)
    return out


# ONNX files are protobufs, limited to 2 GB; larger graphs keep their weights in FILE.data beside.
ONNX_INLINE_LIMIT = 1800 * 2**20


@torch.no_grad()
def export_onnx(detector: Detector, out: Path, opset: int = 18) -> Path:
    try:
        import onnx
        from google.protobuf.message import EncodeError
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install -r requirements-export.txt") from None
    core = ExportModel(detector.model)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*core.parameters(), *core.buffers()])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        raw = Path(work) / "graph.onnx"
        torch.onnx.export(core, (example_input(detector),), str(raw), input_names=["images"],
                          output_names=core.output_names, opset_version=opset, dynamo=False,
                          dynamic_axes={"images": {0: "N", 1: "H", 2: "W", 3: "C"},
                                        **{name: {0: "N"} for name in core.output_names}})
        model = onnx.load(str(raw))
        for key, value in metadata(detector).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        final = Path(work) / out.name
        # Constant folding stores the bank a second time (the search's transposed chunks).
        external = 2 * weight_bytes > ONNX_INLINE_LIMIT
        try:
            onnx.save(model, str(final), save_as_external_data=external, all_tensors_to_one_file=True,
                      location=f"{out.name}.data")
        except (ValueError, EncodeError):  # over protobuf's 2 GB after all
            external = True
            onnx.save(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{out.name}.data")
        if external:
            os.replace(Path(work) / f"{out.name}.data", out.parent / f"{out.name}.data")
        os.replace(final, out)
    return out


def export(detector: Detector, fmt: str, out: str | Path) -> Path:
    """Write ``detector`` as ``fmt`` (``torchscript`` or ``onnx``) to ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return export_torchscript(detector, out) if fmt == "torchscript" else export_onnx(detector, out)


def load_torchscript(path: str | Path, **kwargs) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation notice: TorchScript is what this export writes and
    what a deployment loads, so the notice tells the user of ``export.py`` nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* deprecated", category=FutureWarning)
        return torch.jit.load(str(path), **kwargs)


def run_exported(path: str | Path, fmt: str, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Score uint8 ``(N, H, W, C)`` images with an exported file (as a deployment would): scores,
    maps, and for a certified coreset whether each image score is certified."""
    if fmt == "torchscript":
        with torch.no_grad():
            outputs = load_torchscript(path)(torch.from_numpy(np.ascontiguousarray(images)))
        return tuple(output.numpy() for output in outputs)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"images": np.ascontiguousarray(images)}))


def read_metadata(path: str | Path, fmt: str) -> dict:
    """The metadata stored beside an exported graph (threshold, settings, provenance)."""
    if fmt == "torchscript":
        extra = {"metadata.json": ""}
        load_torchscript(path, _extra_files=extra)
        return json.loads(extra["metadata.json"])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
