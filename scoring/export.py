"""Export a :class:`scoring.Detector` as one self-contained file: TorchScript or ONNX.

The exported graph does everything :meth:`Detector.predict` does after decoding: it takes the
raw uint8 image batch ``(N, H, W, C)`` (``C`` = 1 or 3; TorchScript also takes ``(N, H, W)``),
resizes it to ``S x S`` (bilinear, half-pixel centres, rounded to uint8 values as the training
pipeline does), scales to [0, 1], runs the network, searches the memory banks (exact Euclidean
nearest neighbours, as matrix products over bank chunks, then the exact distance of the chosen
rows) and fuses the maps. Outputs: ``scores`` ``(N,)`` float32 and ``maps`` ``(N, S, S)`` float32.
The threshold is not in the graph: it is stored beside it (TorchScript ``_extra_files``, ONNX
metadata ``threshold``), with the settings, so a deployment can change it without re-exporting.

Decoding (file formats, EXIF orientation, 16-bit scaling, box-reducing huge images) stays
outside: give the graph the 8-bit pixels as a viewer shows them.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from errors import UserError
from models import HEAD_STAGES

from . import dense
from .detector import Detector
from .fusion import concat_layers, gaussian_smooth, resize_map

FORMATS = ("torchscript", "onnx")
# Bank rows compared with the queries in one matrix product: bounds the exported graph's memory
# (queries x rows x 4 bytes; 16 images of 256 px at layer 2 = 16k queries -> 256 MB).
CHUNK_ROWS = 4096
# Candidates beyond k whose exact distances are computed ((queries, k + SHORTLIST, D) floats).
SHORTLIST = 8


def knn_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, k: int,
                  chunk_rows: int = CHUNK_ROWS, shortlist: int = SHORTLIST) -> torch.Tensor:
    """``(M, D)`` queries, ``(B, D)`` bank -> ``(M, k)`` exact distances to the ``k`` nearest rows.

    Both must be centred on the bank's mean (distances are unchanged; uncentred ReLU features
    make the expansion cancel catastrophically). ``k + shortlist`` candidates per query are
    ranked with ``|b|^2 - 2 q.b`` per chunk of rows (traceable: the number of chunks is fixed by
    the bank); their distances are then computed directly and the ``k`` smallest returned, so
    near-ties that float32 ranking gets wrong (seen: 0.04 on a distance of 100) cost nothing.
    """
    keep = min(bank.shape[0], k + shortlist)
    best_val: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    for start in range(0, bank.shape[0], chunk_rows):
        block = bank[start:start + chunk_rows]
        approx = bank_sq[start:start + chunk_rows][None, :] - 2.0 * (queries @ block.t())
        val, idx = approx.topk(min(keep, block.shape[0]), dim=1, largest=False)
        idx = idx + start
        if best_val is None or best_idx is None:
            best_val, best_idx = val, idx
        else:
            merged_idx = torch.cat([best_idx, idx], 1)
            best_val, pick = torch.cat([best_val, val], 1).topk(keep, dim=1, largest=False)
            best_idx = merged_idx.gather(1, pick)
    assert best_idx is not None
    chosen = bank[best_idx.reshape(-1)].view(best_idx.shape[0], best_idx.shape[1], bank.shape[1])
    exact = (chosen - queries[:, None, :]).pow(2).sum(-1)
    return exact.topk(k, dim=1, largest=False).values.clamp_min(0).sqrt()


class ExportableDetector(nn.Module):
    """A detector as a pure tensor function: uint8 ``(N, H, W, C)`` -> ``(scores (N,), maps (N, S, S))``."""

    def __init__(self, detector: Detector, chunk_rows: int = CHUNK_ROWS):
        super().__init__()
        config = detector.config
        # A copy (the detector keeps its own) in the plain NCHW layout: saved TorchScript weights
        # come back NCHW, and channels_last inputs against them fall to PyTorch's slow convolution
        # (600 ms instead of 30 for wave18 at 64 px). oneDNN then sums in another order than in
        # predict()'s channels_last run: features differ by ~1e-6 relative (see README Export).
        self.net = copy.deepcopy(detector.model).eval().to("cpu", memory_format=torch.contiguous_format)
        self.net.requires_grad_(False)  # the exported graph never builds an autograd graph
        # What scoring never runs stays out of the file: the classifier, and stages past the last scored one.
        self.map_source = config.map_source
        last_stage = max(*config.layers, HEAD_STAGES if dense.uses_head(self.map_source) else 1)
        for name in ("fc", "head", "out", *(f"layer{i}" for i in range(last_stage + 1, 5))):
            setattr(self.net, name, nn.Identity())
        if not dense.uses_head(self.map_source):
            self.net.seg_head = None
        self.last_stage, self.map_norm = last_stage, detector.map_norm
        self.size, self.antialias, self.k, self.smooth = config.size, config.antialias, config.k, config.smooth
        self.layers, self.fusion, self.chunk_rows = list(config.layers), config.fusion, chunk_rows
        self.refine = [bank.refine if bank.refining else 0 for bank in detector.scorer.banks]
        for i, bank in enumerate(detector.scorer.banks):
            source = bank.full if bank.refining else bank.rows
            mean = source.float().mean(0)
            rows = (bank.rows.float() - mean).contiguous()
            full = (bank.full.float() - mean).contiguous() if bank.refining else rows[:1]  # placeholder
            self.register_buffer(f"mean{i}", mean)
            self.register_buffer(f"bank{i}", rows)
            self.register_buffer(f"bank{i}_sq", (rows * rows).sum(1))
            self.register_buffer(f"full{i}", full)
            self.register_buffer(f"full{i}_sq", (full * full).sum(1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, H, W, C)`` -> float ``(N, 3, S, S)`` in [0, 1], rounded as the uint8 pipeline."""
        x = images[..., :3].permute(0, 3, 1, 2).float()
        x = x.expand(-1, 3, -1, -1)  # grayscale (C = 1) -> 3 channels; no-op for RGB
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=self.antialias)
        return x.round().clamp(0, 255) / 255.0

    def patch_map(self, grid: torch.Tensor, i: int) -> torch.Tensor:
        """``(N, D, h, w)`` -> ``(N, h, w)`` mean distance to the ``k`` nearest rows of bank ``i``."""
        n, d, h, w = grid.shape
        patches = grid.permute(0, 2, 3, 1).reshape(-1, d) - getattr(self, f"mean{i}")
        bank, bank_sq = getattr(self, f"bank{i}"), getattr(self, f"bank{i}_sq")
        dist = knn_distances(patches, bank, bank_sq, self.k, self.chunk_rows).mean(1).view(n, h * w)
        refine = self.refine[i]
        if refine > 0:
            top = dist.topk(min(refine, h * w), dim=1).indices
            offsets = torch.arange(n, device=dist.device)[:, None] * (h * w)
            rows = (top + offsets).reshape(-1)
            full, full_sq = getattr(self, f"full{i}"), getattr(self, f"full{i}_sq")
            exact = knn_distances(patches[rows], full, full_sq, self.k, self.chunk_rows).mean(1)
            dist = dist.scatter(1, top, exact.view(top.shape))
        return dist.view(n, h, w)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images)
        stages = self.net.forward_features(x, stages=self.last_stage)
        feats = [F.avg_pool2d(stages[layer - 1], 3, stride=1, padding=1) for layer in self.layers]
        if self.map_source == "head":
            return dense.combine("head", None, self.net.seg_head(stages), self.map_norm, self.size)
        scores, maps = self.knn_maps(feats)
        if self.map_source == "fused":
            return dense.combine("fused", maps, self.net.seg_head(stages), self.map_norm, self.size)
        return scores, maps

    def knn_maps(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> k-NN image scores ``(N,)`` and maps ``(N, S, S)`` (the fusion's)."""
        if self.fusion == "concatenation":
            patch_map = self.patch_map(concat_layers(feats), 0)
            scores = patch_map.flatten(1).max(1).values
            maps = resize_map(patch_map, self.size)
        else:
            maps = resize_map(self.patch_map(feats[0], 0), self.size)
            for i in range(1, len(feats)):
                maps = maps * resize_map(self.patch_map(feats[i], i), self.size)
            scores = maps.flatten(1).max(1).values
        return scores, gaussian_smooth(maps, self.smooth)


class _AnyRank(nn.Module):
    """TorchScript front: also takes grayscale ``(N, H, W)`` batches."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() == 3:
            images = images.unsqueeze(-1)
        return self.core(images)


def metadata(detector: Detector) -> dict:
    """What travels beside the graph: threshold, input contract, settings, provenance."""
    return {"threshold": detector.threshold, "threshold_source": (detector.threshold_info or {}).get("source"),
            "input": "uint8 (N, H, W, C), C = 1 or 3 (TorchScript: also (N, H, W)); RGB order",
            "outputs": "scores (N,) float32; maps (N, S, S) float32; verdict = score > threshold",
            "size": detector.size, "config": detector.config.to_dict(), "provenance": detector.provenance}


def example_input(detector: Detector, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, detector.size + 7, detector.size + 3, 3), dtype=torch.uint8, generator=gen)


@torch.no_grad()
def export_torchscript(detector: Detector, out: Path) -> Path:
    core = ExportableDetector(detector)
    traced = torch.jit.trace(core, example_input(detector), check_trace=False)
    scripted = torch.jit.script(_AnyRank(traced))
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
    core = ExportableDetector(detector)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*core.parameters(), *core.buffers()])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        raw = Path(work) / "graph.onnx"
        torch.onnx.export(core, (example_input(detector),), str(raw), input_names=["images"],
                          output_names=["scores", "maps"], opset_version=opset, dynamo=False,
                          dynamic_axes={"images": {0: "N", 1: "H", 2: "W", 3: "C"}, "scores": {0: "N"},
                                        "maps": {0: "N"}})
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


def run_exported(path: str | Path, fmt: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score uint8 ``(N, H, W, C)`` images with an exported file (as a deployment would)."""
    if fmt == "torchscript":
        with torch.no_grad():
            scores, maps = torch.jit.load(str(path))(torch.from_numpy(np.ascontiguousarray(images)))
        return scores.numpy(), maps.numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {"images": np.ascontiguousarray(images)})
    return scores, maps


def read_metadata(path: str | Path, fmt: str) -> dict:
    """The metadata stored beside an exported graph (threshold, settings, provenance)."""
    if fmt == "torchscript":
        extra = {"metadata.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra["metadata.json"])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
