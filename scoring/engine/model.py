"""Where a score is computed: the one scoring module, from images to anomaly maps and image scores.

:class:`AnomalyModel` is an ``nn.Module`` (in the spirit of anomalib's ``torch_model``) that
holds the network and the memory banks as buffers; ``forward`` reads top to bottom:

1. ``features``: the chosen stages of the network, each through a 3x3 average pool (and the
   segmentation head's logits of a dense network; :mod:`scoring.engine.features`);
2. ``AnomalyScorer.forward``: per memory bank the nearest-neighbour distance of every patch
   (:class:`PatchBank`: the exact search of :class:`scoring.engine.knn.BankSearch`, and with a coreset
   the refinement of each image's highest patches in the whole bank), the fusion of the bank
   maps (:class:`Fusion`: the paper's concatenation or multiplication), the Gaussian
   smoothing, and for a dense network the head's map (:func:`combine_head`).

``Detector.predict``, the inference scripts, the threshold calibration, the synthetic check and
the benchmarks all run this module; the exported files *are* it (:class:`ExportModel` only adds
the uint8 preprocessing in front and is traced), so they score as ``predict`` does by
construction.

The fusions (the paper's two ways of fusing multi-level patch features into one map):

- *concatenation*: every chosen layer is upsampled (nearest, the paper's; or bilinear) onto the
  first (finest) layer's grid and concatenated on channels; one memory bank; the ``h x w`` distance map is resized
  bilinearly to ``S x S``; the image score is the maximum of the ``h x w`` map;
- *multiplication*: one bank and one distance map per layer, each resized bilinearly to
  ``S x S``, multiplied together; the image score is the maximum of the product map.
"""

from __future__ import annotations

import abc
import copy
import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from common.distributed import DistInfo, all_reduce_sum, part_offset
from common.errors import SettingError
from data.frames import Frame, as_frame
from data.images import network_input
from models import HEAD_STAGES

from ..config import ScoreConfig
from .cells import in_cell_order, tightened
from .coreset import GreedyCoresetSampler
from .dense import uses_head
from .features import batched_features, pooled_features
from .knn import BankSearch, TorchShortlist

# Images scored per pass of the eager loop (bounds the memory of one pass's patch queries).
IMAGES_PER_PASS = 64
# Rounds of re-search in an exported graph, which has no data-dependent loop: refine x (1 + 2 + 4 +
# 8) candidates per image; the file reports which image scores are certified (see certify).
EXPORT_ROUNDS = 4


# -- fusion ---------------------------------------------------------------------------------
def to_patches(feat: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N h w, C)``, row-major over (image, y, x)."""
    return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])


def concat_layers(feats: list[torch.Tensor], upsample: str = "nearest",
                  scales: list[float] | None = None) -> torch.Tensor:
    """``[(N, C_l, h_l, w_l)]`` -> ``(N, sum C_l, h_0, w_0)``: each layer resized onto layer 0's grid.

    ``nearest`` (the paper's code) repeats each coarser feature over the finer cells it covers, so
    the map steps at the coarser layer's cell edges; ``bilinear`` (half-pixel centres, PatchCore's
    choice) blends the neighbouring coarser features instead. ``scales`` (one per layer,
    :func:`layer_scales`) multiply each layer's features first; ``None``: as they are (the paper)."""
    if scales is not None:
        feats = [f if scale == 1.0 else f * scale for f, scale in zip(feats, scales)]
    target = feats[0].shape[-2:]
    options = {"mode": "nearest"} if upsample == "nearest" else {"mode": "bilinear", "align_corners": False}
    resized = [f if f.shape[-2:] == target else F.interpolate(f, size=target, **options) for f in feats]
    return torch.cat(resized, dim=1)


def layer_scales(feats: list[torch.Tensor], shards: DistInfo | None = None,
                 device: torch.device | str = "cpu") -> list[float]:
    """Per layer ``(N, C_l, h_l, w_l)`` features of the bank's images -> one scale per layer that gives it
    the last (coarsest) layer's total variance over those patches (the sum of its channels' variances):
    ``sqrt(total_last / total_l)``; the last layer's is 1. A nearest-neighbour distance over the
    concatenation then weighs the layers alike, where unscaled the wider, more varied coarse layer
    outweighs the finer one (wave18: layer 3 varies 1.2-4.3 times as much as layer 2). With
    ``shards`` (torchrun) the sums cover every rank's images (reduced on ``device``, the collective's), so
    every rank gets the same scales."""
    totals = []
    for feat in feats:
        feat = feat.detach().float()
        # (sum of each channel, sum of its squares, the patch count): what the ranks add up; each image's
        # sums in float32, their total in float64
        packed = torch.cat([feat.sum((2, 3)).double().sum(0), (feat * feat).sum((2, 3)).double().sum(0),
                            torch.tensor([feat.numel() // feat.shape[1]], dtype=torch.float64)])
        if shards is not None and shards.enabled:
            packed = all_reduce_sum(packed.to(device), shards).cpu()
        channels, count = feat.shape[1], packed[-1]
        mean = packed[:channels] / count
        totals.append(float((packed[channels:2 * channels] / count - mean.pow(2)).clamp(min=0).sum()))
    # A layer that does not vary at all (a constant image set) keeps its features as they are.
    return [math.sqrt(totals[-1] / total) if total > 0 and totals[-1] > 0 else 1.0 for total in totals]


def resize_map(maps: torch.Tensor, size: int | Frame) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, H, W)`` (``size``: a square side or the frame ``(H, W)``), bilinear
    (half-pixel centres, no antialiasing)."""
    return F.interpolate(maps[:, None], size=as_frame(size), mode="bilinear", align_corners=False)[:, 0]


class Fusion(abc.ABC):
    """How the paper fuses multi-level patch features: what each memory bank holds, and how the
    banks' distance maps become one map and one image score. Defined once here; the map, the image
    score and the coreset certification's bounds (:meth:`AnomalyScorer.certify`) all read it.

    ``terms``: the ``(N, Q)`` values whose maximum is the image score, from per-bank distances
    ``(N, P_b)``; monotone in every distance, so distances that are upper bounds give bounds.
    """

    name = ""

    @abc.abstractmethod
    def grids(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> per bank ``(N, C_b, h_b, w_b)``: what each bank holds."""

    @abc.abstractmethod
    def terms(self, values: list[torch.Tensor], shapes: list[tuple[int, int]], frame: Frame) -> torch.Tensor:
        """Per bank distances ``(N, P_b)`` on grids of ``shapes`` -> ``(N, Q)``: the image score is their maximum."""

    @abc.abstractmethod
    def open_terms(self, exact: list[torch.Tensor], shapes: list[tuple[int, int]], frame: Frame) -> torch.Tensor:
        """``(N, Q)`` bool: the terms that read a distance not yet exact (per bank ``(N, P_b)`` ``exact``)."""

    @abc.abstractmethod
    def contributors(self, terms: torch.Tensor, shape: tuple[int, int], frame: Frame) -> torch.Tensor:
        """``(N, c)`` term indices -> ``(N, c x m)`` cells of a bank's ``shape`` grid they read."""

    @abc.abstractmethod
    def fuse(self, patch_maps: list[torch.Tensor], frame: Frame) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bank ``(N, h_b, w_b)`` distance maps -> image scores ``(N,)`` and maps ``(N, H, W)`` (``frame``)."""


class Concatenation(Fusion):
    """Every chosen layer upsampled (``upsample``: nearest or bilinear) onto the finest layer's grid and
    concatenated on channels: one bank; the image score is the maximum of its ``h x w`` map (the terms
    are its cells), the map that grid resized bilinearly to the frame."""

    name = "concatenation"

    def __init__(self, upsample: str = "nearest", scales: list[float] | None = None):
        self.upsample, self.scales = upsample, scales

    def grids(self, feats):
        return [concat_layers(feats, self.upsample, self.scales)]

    def terms(self, values, shapes, frame):
        return values[0]

    def open_terms(self, exact, shapes, frame):
        return ~exact[0]

    def contributors(self, terms, shape, frame):
        return terms

    def fuse(self, patch_maps, frame):
        n = patch_maps[0].shape[0]
        scores = self.terms([patch_maps[0].reshape(n, -1)], [], frame).max(1).values
        return scores, resize_map(patch_maps[0], frame)


class Multiplication(Fusion):
    """One bank per layer; each layer's map resized bilinearly to the frame, the maps multiplied:
    the image score is the maximum of the product (the terms are its pixels)."""

    name = "multiplication"

    def grids(self, feats):
        return list(feats)

    def terms(self, values, shapes, frame):
        return self.resized_combined(values, shapes, frame, torch.mul)

    def open_terms(self, exact, shapes, frame):
        # A pixel reads a cell where that cell's resized indicator is not zero there.
        return self.resized_combined([(~done).float() for done in exact], shapes, frame, torch.add) > 0

    @staticmethod
    def resized_combined(values, shapes, frame, combine):
        """Per bank ``(N, P_b)`` on grids of ``shapes`` -> ``(N, H W)``: each resized to ``frame``, then
        ``combine``d in bank order (``torch.mul``: the product map; ``torch.add``: a sum)."""
        n, total = values[0].shape[0], None
        for value, (h, w) in zip(values, shapes):
            resized = resize_map(value.view(n, h, w), frame)
            total = resized if total is None else combine(total, resized)
        return total.flatten(1)

    def contributors(self, terms, shape, frame):
        # The 3 x 3 cells around a pixel's bilinear source position: a superset of the 2 x 2 it
        # reads, whatever the rounding of that position.
        h, w = shape
        out_h, out_w = frame
        y = torch.div(terms, out_w, rounding_mode="floor")
        x = terms - y * out_w

        def near(coord: torch.Tensor, length: int, out: int) -> torch.Tensor:
            source = ((coord.float() + 0.5) * (length / out) - 0.5).clamp(min=0).floor().long()
            return torch.stack([source - 1, source, source + 1], -1).clamp(0, length - 1)

        cells = near(y, h, out_h)[..., :, None] * w + near(x, w, out_w)[..., None, :]  # (N, c, 3, 3)
        return cells.flatten(1)

    def fuse(self, patch_maps, frame):
        n = patch_maps[0].shape[0]
        shapes = [tuple(m.shape[-2:]) for m in patch_maps]
        maps = self.terms([m.reshape(n, -1) for m in patch_maps], shapes, frame).view(n, *as_frame(frame))
        return maps.flatten(1).max(1).values, maps


def fusion_rule(config: ScoreConfig, scales: list[float] | None = None) -> Fusion:
    """The :class:`Fusion` of ``config`` (its ``fusion``; concatenation with its ``upsample`` and, with
    ``balance``, the bank's layer ``scales``: :func:`layer_scales`)."""
    if config.fusion != Concatenation.name:
        return Multiplication()
    return Concatenation(config.upsample, scales if balances_layers(config) else None)


def bank_grids(config: ScoreConfig, feats: list[torch.Tensor], scales: list[float] | None = None) -> list[torch.Tensor]:
    """Per layer ``(N, C_l, h_l, w_l)`` -> what each bank of ``config``'s fusion holds (:meth:`Fusion.grids`)."""
    return fusion_rule(config, scales).grids(feats)


def balances_layers(config: ScoreConfig) -> bool:
    """Whether ``config``'s bank scales its layers (:func:`layer_scales`): ``balance`` with concatenation
    over more than one layer (multiplication searches each layer alone, where a scale changes nothing)."""
    return config.balance and config.fusion == Concatenation.name and len(config.layers) > 1


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(N, H, W)`` Gaussian blur truncated at 4 sigma, mirrored borders (scipy's gaussian_filter, mode='mirror')."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    out = maps[:, None]
    pad_h = min(radius, out.shape[-2] - 1)
    pad_w = min(radius, out.shape[-1] - 1)
    out = F.pad(out, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    k_h = kernel[radius - pad_h: radius + pad_h + 1] if pad_h < radius else kernel
    k_w = kernel[radius - pad_w: radius + pad_w + 1] if pad_w < radius else kernel
    if torch.jit.is_tracing():  # a graph keeps any batch size
        return F.conv2d(F.conv2d(out, k_h.view(1, 1, -1, 1)), k_w.view(1, 1, 1, -1))[:, 0]
    # One image at a time: the convolution's rounding depends on the batch it runs in (up to 4e-6),
    # and an image's map must not depend on its neighbours (torchrun shares, passes of 64).
    return torch.cat([F.conv2d(F.conv2d(one, k_h.view(1, 1, -1, 1)), k_w.view(1, 1, 1, -1))
                      for one in out.split(1)])[:, 0]


def lower_floor(maps: torch.Tensor, share: float) -> torch.Tensor:
    """``(N, H, W)`` maps, each less ``share`` of its own minimum (``share`` 0: unchanged).

    Pixel AUROC and AUPRO rank every pixel of every test image together, so a map whose normal
    part sits higher than the others' (a darker or grainier image) puts its normal pixels above
    other images' defects; taking part of each map's floor off evens that out. Part, not all: on
    some data (Magnetic Tile) a defective image's whole map sits higher, and its floor is evidence
    (docs/results.md "A per-image offset of the maps")."""
    if share <= 0:
        return maps
    return maps - share * maps.flatten(1).amin(1)[:, None, None]


def head_map(head_logits: torch.Tensor, size: Frame) -> torch.Tensor:
    """A segmentation head's logits ``(N, 1, h, w)`` -> ``(N, H, W)`` (``size``; bilinear, as the k-NN maps)."""
    return resize_map(head_logits[:, 0].float(), size)


def combine_head(map_source: str, knn_maps: torch.Tensor | None, head_logits: torch.Tensor, norm: dict[str, float],
                 size: Frame) -> tuple[torch.Tensor, torch.Tensor]:
    """k-NN maps ``(N, S, S)`` (``None`` for ``head``) and head logits ``(N, 1, h, w)`` -> image scores
    ``(N,)`` and maps ``(N, S, S)`` of ``map_source`` (``head`` or ``fused``), each map normalised by
    ``norm`` (:func:`scoring.engine.dense.map_norm`); the image score is the map's maximum."""
    maps = (head_map(head_logits, size) - norm["head_mean"]) / norm["head_std"]
    if map_source == "fused":
        maps = maps + (knn_maps - norm["knn_mean"]) / norm["knn_std"]
    return maps.flatten(1).max(1).values, maps


# -- memory banks ---------------------------------------------------------------------------
def require_chosen_view(config: ScoreConfig) -> None:
    """Banks and scorers are of one view: ``image_view`` auto must be chosen first (a ``ValueError``)."""
    if config.image_view == "auto":
        raise ValueError("image_view auto must be chosen first (scoring.engine.views.choose_view)")


def bank_states(config: ScoreConfig, train_feats: list[torch.Tensor], device: torch.device | str = "cpu",
                shards: DistInfo | None = None, sampler: GreedyCoresetSampler | None = None) -> list[dict]:
    """The banks of the config's fusion from normal images' per-layer features ``(N, C_l, h_l, w_l)``
    (entries past ``config.layers``, a head's logits, are not banked): per bank ``rows`` (with
    ``config.coreset < 1`` the rows ``sampler`` keeps: the config's :class:`GreedyCoresetSampler`
    unless another is given), ``full`` (the whole bank beside a coreset, else ``None``; with
    ``config.cells`` in one process in the cell order of :mod:`.cells`), ``cell_starts`` (there, where
    each coreset row's cell starts in ``full``, else ``None``), ``scales`` (with ``balance``, the layers'
    :func:`layer_scales` the rows were made with, else ``None``) and the coreset's settings. Plain tensors and
    values: the bank cache and detector files hold these.
    With ``shards`` (torchrun, a sharded bank) ``train_feats`` are this rank's block of images and
    the states its part of each bank: its rows of the coreset one process would choose.
    With a square view (``config.view_preprocessing``) its banks follow, of the last ``len(layers)``
    features (:func:`scoring.engine.features.pooled_features`), at ``config.view_config``."""
    require_chosen_view(config)
    sampler = sampler or GreedyCoresetSampler(config.coreset, config.coreset_dim, config.seed)
    states = []
    layers = train_feats[:len(config.layers)]
    scales = layer_scales(layers, shards, device) if balances_layers(config) else None
    for grid in bank_grids(config, layers, scales):
        patches = to_patches(grid).detach().float().cpu().contiguous()
        rows, full = patches, None
        if config.coreset < 1:
            offset, total = part_offset(patches.shape[0], shards)
            check_coreset_size(config.coreset, total, grid.shape[-2] * grid.shape[-1])
            keep = sampler.select(patches, device, shards) - offset
            keep = keep[(keep >= 0) & (keep < patches.shape[0])]  # this rank's rows of the whole bank's coreset
            rows, full = patches[keep].contiguous(), patches
        starts = None
        if full is not None and config.cells > 0 and (shards is None or not shards.enabled):  # (not across processes)
            full, starts = in_cell_order(BankSearch(rows, config.knn), full)
        states.append({"rows": rows, "full": full, "cell_starts": starts, "coreset": config.coreset,
                       "coreset_dim": config.coreset_dim, "seed": config.seed, "scales": scales})
    if config.view_preprocessing is not None:
        states += bank_states(config.view_config, train_feats[-len(config.layers):], device, shards)
    return states


def check_coreset_size(fraction: float, rows: int, per_image: int) -> None:
    """A coreset of fewer rows than one image has patches says nothing about normal images: refused."""
    keep = math.ceil(fraction * rows)
    if keep < per_image:
        least = math.ceil(100 * per_image / rows) / 100  # the smallest fraction in hundredths that keeps one image
        raise SettingError("coreset", fraction, f"keeps {keep} of the bank's {rows} patches, fewer than one image's "
                                                f"{per_image}: far too small to describe normal images; with these "
                                                f"{rows // per_image} training images use {{setting}}{least:g} or "
                                                "more (1 keeps the whole bank), or add training images")


class PatchBank(nn.Module):
    """One memory bank: its searched rows (a coreset or the whole bank), and beside a coreset the
    whole bank, in which :class:`AnomalyScorer` re-searches the patches the image score depends on,
    and the coreset rows' cells (:mod:`.cells`: the whole bank in their order), which bring the other
    cells' values near the whole bank's (made here when a state has none: a bank saved before them).
    """

    def __init__(self, state: dict, refine: int = 0, backend: str = "auto", precision: str = "auto",
                 shards: DistInfo | None = None, cells: int = 0):
        super().__init__()
        self.search = BankSearch(state["rows"], backend, precision, shards)
        refining = state.get("full") is not None and refine > 0
        full, starts = state.get("full"), state.get("cell_starts")
        listing = refining and self.search.shards is None and cells > 0
        self.cells = cells if listing else 0  # rows read per patch from its coreset row's cell
        if listing and starts is None:
            full, starts = in_cell_order(self.search, full)
        # The whole bank is searched for the patches certification picks (BankSearch takes the torch
        # search for a handful of queries, which faiss scans without BLAS).
        self.whole = BankSearch(full, backend, precision, shards) if refining else None
        if self.whole is not None:
            self.whole.ranks_windows = self.cells > 0
        self.coreset, self.coreset_dim, self.seed = state["coreset"], state["coreset_dim"], state["seed"]
        self.scales = state.get("scales")  # the layers' scales its rows hold (balance), queries take them too
        # A buffer: it moves with .to() and a traced graph holds it once.
        self.register_buffer("cell_starts", starts if listing else None)

    def state(self) -> dict:
        """What :func:`bank_states` made (the whole bank and its cell starts only when they are searched)."""
        return {"rows": self.search.rows.cpu(), "full": None if self.whole is None else self.whole.rows.cpu(),
                "cell_starts": None if self.cell_starts is None else self.cell_starts.cpu(),
                "coreset": self.coreset, "coreset_dim": self.coreset_dim, "seed": self.seed, "scales": self.scales}

    def forward(self, patches: torch.Tensor, k: int) -> torch.Tensor:
        """``(M, D)`` patches -> ``(M,)`` mean distance to their ``k`` nearest searched rows: the exact
        distance without a coreset, an upper bound of it with one (a subset's k nearest are no nearer),
        for ``k = 1`` tightened by the nearest coreset row's cell list (:func:`.cells.tightened`)."""
        if self.cell_starts is not None and k == 1:
            return tightened(self.search, self.whole, self.cell_starts, patches, self.cells)
        return self.search(patches, k).mean(1)

    def exact(self, patches: torch.Tensor, k: int) -> torch.Tensor:
        """``(M, D)`` -> ``(M,)`` mean distance to the ``k`` nearest rows of the whole bank."""
        return (self.search if self.whole is None else self.whole)(patches, k).mean(1)


class AnomalyScorer(nn.Module):
    """The memory banks of one category with the scoring settings: features -> scores and maps.

    Build one with :meth:`fit` (from normal images' features) or :meth:`from_states` (banks of
    :func:`bank_states`, e.g. from the bank cache or a detector file). ``map_norm`` (the maps'
    normalisation on training images, :func:`scoring.engine.calibration.cross_fitted_calibration`) is needed by the
    ``head`` and ``fused`` map sources only.
    """

    def __init__(self, banks: list[PatchBank], config: ScoreConfig, map_norm: dict | None = None,
                 view: AnomalyScorer | None = None):
        super().__init__()
        if config.size is None:
            raise ValueError("config.size must be resolved (the network's input size)")
        # The output frame (H, W): resize_map and the certification's pixel coordinates read it.
        if uses_head(config.map_source) and map_norm is None:
            raise ValueError("a head map source needs map_norm (scoring.engine.calibration.cross_fitted_calibration)")
        self.banks = nn.ModuleList(banks)
        self.fusion, self.size, self.k, self.smooth = config.fusion, config.frame_hw, config.k, config.smooth
        self.floor = config.floor
        if balances_layers(config) and not (banks and banks[0].scales):
            raise ValueError("a balanced concatenation needs its bank's layer scales (bank_states makes them)")
        self.fusion_rule = fusion_rule(config, banks[0].scales if banks else None)
        self.map_source, self.layer_count, self.map_norm = config.map_source, len(config.layers), map_norm
        self.refine, self.certify_scores = config.refine, config.certify
        self.coreset = any(bank.coreset < 1 for bank in banks)  # searched rows whose distances are bounds
        self.search_stats: dict = {}  # of the last :meth:`score` call (re-searched patches, certified images)
        self.search_counts: tuple[torch.Tensor, torch.Tensor] | None = None  # its per-image counts
        # The square view's scorer where it gives the image scores (scoring.engine.views), else None.
        self.view = view

    @classmethod
    def from_states(cls, config: ScoreConfig, states: list[dict], map_norm: dict | None = None,
                    device: torch.device | str = "cpu", shards: DistInfo | None = None) -> AnomalyScorer:
        """The scorer of :func:`bank_states`' states; with ``shards`` (a sharded bank) the states
        are this rank's parts and every search returns the whole bank's answer."""
        require_chosen_view(config)
        view = None
        if config.view_preprocessing is not None:  # the frame's banks, then the square view's (bank_states)
            half = len(states) // 2
            view = cls.from_states(config.view_config, states[half:], None, device, shards)
            states = states[:half]
        banks = [PatchBank(state, config.refine, config.knn, config.knn_precision, shards, config.cells)
                 for state in states]
        return cls(banks, config, map_norm, view).to(device)

    @classmethod
    def fit(cls, config: ScoreConfig, train_feats: list[torch.Tensor], map_norm: dict | None = None,
            device: torch.device | str = "cpu") -> AnomalyScorer:
        """Banks from normal images' per-layer features ``(N, C_l, h_l, w_l)`` (see :func:`bank_states`)."""
        return cls.from_states(config, bank_states(config, train_feats, device), map_norm, device)

    def all_banks(self) -> list[PatchBank]:
        """The frame's banks, then the square view's (the order of :func:`bank_states`)."""
        return list(self.banks) + (list(self.view.banks) if self.view is not None else [])

    @property
    def backend(self) -> str:
        return self.banks[0].search.backend if len(self.banks) else "none"

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` (then a head's logits ``(N, 1, h, w)`` for ``head`` / ``fused``)
        -> image scores ``(N,)`` and maps ``(N, S, S)`` (:meth:`search_maps` without its search report)."""
        scores, maps, _, _ = self.search_maps(feats)
        return scores, maps

    def search_maps(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`, and per image whether its score is certified exact ``(N,)`` bool and how
        many patches were re-searched in the whole bank ``(N,)`` (see :meth:`knn_maps`). ``smooth``
        blurs the k-NN maps only, then ``floor`` takes a share of each one's minimum off
        (:func:`lower_floor`); their image scores are taken before both (the paper's). With a square
        view (:attr:`view`) the image scores, and whether they are certified, are the view's: the
        maximum of its map over the last ``len(layers)`` features; the maps stay the frame's."""
        if self.map_source == "head":  # no k-NN search: the head's map alone
            scores, maps = combine_head("head", None, feats[self.layer_count], self.map_norm, self.size)
            searched = torch.zeros_like(scores, dtype=torch.long)
            return scores, maps, torch.ones_like(searched, dtype=torch.bool), searched
        patch_maps, certified, searched = self.knn_maps(feats)
        scores, maps = self.fusion_rule.fuse(patch_maps, self.size)
        maps = lower_floor(gaussian_smooth(maps, self.smooth), self.floor)
        if self.map_source == "fused":
            scores, maps = combine_head("fused", maps, feats[self.layer_count], self.map_norm, self.size)
        if self.view is not None:
            scores, _, certified, view_searched = self.view.search_maps(feats[-self.layer_count:])
            searched = searched + view_searched
        return scores, maps, certified, searched

    # -- nearest-neighbour maps, with a coreset certified -----------------------------------
    def knn_maps(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per layer ``(N, C_l, h_l, w_l)`` -> per bank the ``(N, h_b, w_b)`` distance map, whether each
        image score is certified exact ``(N,)`` bool, and the patches re-searched per image ``(N,)``.

        Without a coreset every distance is exact. With one, a patch's coreset distance is an upper
        bound of its exact distance (a subset's ``k`` nearest are no nearer), so the image score can
        be certified (:meth:`certify`); ``certify=False`` re-searches each bank's ``refine`` highest
        patches once instead (uncertified), ``refine=0`` none (pure coreset).
        """
        grids = self.fusion_rule.grids(feats[:self.layer_count])
        n = grids[0].shape[0]
        shapes = [(int(g.shape[-2]), int(g.shape[-1])) for g in grids]
        patches = [to_patches(g) for g in grids]
        values = [bank(p, self.k).view(n, -1) for bank, p in zip(self.banks, patches)]
        device = values[0].device
        searched = torch.zeros(n, dtype=torch.long, device=device)
        certified = (torch.zeros_like if self.coreset else torch.ones_like)(searched, dtype=torch.bool)
        if self.coreset and self.certify_scores:
            certified, searched = self.certify(values, patches, shapes)
        elif self.coreset and self.refine > 0:
            for layer, bank in enumerate(self.banks):  # each bank's top patches once: fast, uncertified
                top = values[layer].topk(min(self.refine, values[layer].shape[1]), dim=1).indices
                values[layer] = self.researched(bank, patches[layer], values[layer], top)
                searched = searched + top.shape[1]
        return [v.view(n, *shape) for v, shape in zip(values, shapes)], certified, searched

    def researched(self, bank: PatchBank, patches: torch.Tensor, values: torch.Tensor,
                   cells: torch.Tensor) -> torch.Tensor:
        """``values`` ``(N, P)`` with the ``cells`` ``(N, c)`` of each image replaced by their exact distances."""
        rows = (cells + torch.arange(values.shape[0], device=values.device)[:, None] * values.shape[1]).reshape(-1)
        fresh = bank.exact(patches[rows.to(patches.device)], self.k).to(values.device)
        return values.scatter(1, cells, fresh.view(cells.shape))

    def image_bound(self, values: list[torch.Tensor], exact: list[torch.Tensor],
                    shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """What each image score is the maximum of, from the current distances: ``(N, Q)`` values
        (:meth:`Fusion.terms`) and which of them are still open (:meth:`Fusion.open_terms`: an
        upper bound, some distance it reads is not exact yet). A fusion's terms are monotone in
        every distance, all non-negative, so a bound stays a bound."""
        return self.fusion_rule.terms(values, shapes, self.size), self.fusion_rule.open_terms(exact, shapes, self.size)

    def certify(self, values: list[torch.Tensor], patches: list[torch.Tensor],
                shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-search, in the whole bank, the cells the image score may depend on, highest bound
        first, until no open bound is above the best exact value: then the score *is* the exact
        bank's. Rounds of ``refine``, ``2 refine``, ``4 refine``, ... candidates (one pass over the
        whole bank each); the entries of ``values`` are replaced as cells turn exact. A traced graph runs
        :data:`EXPORT_ROUNDS` rounds and reports which images are certified. Returns certified
        ``(N,)`` bool and the cells re-searched per image ``(N,)``.
        """
        n = values[0].shape[0]
        tracing = torch.jit.is_tracing()
        exact = [torch.zeros_like(v, dtype=torch.bool) for v in values]
        searched = torch.zeros(n, dtype=torch.long, device=values[0].device)
        rounds = 0
        while True:
            bound, open_ = self.image_bound(values, exact, shapes)
            best = bound.masked_fill(open_, float("-inf")).amax(1)
            certified = bound.masked_fill(~open_, float("-inf")).amax(1) <= best
            if (rounds == EXPORT_ROUNDS) if tracing else bool(certified.all()):
                return certified, searched
            count = min(self.refine * 2 ** rounds, bound.shape[1])
            pick = bound.masked_fill(~open_ | certified[:, None], float("-inf")).topk(count, dim=1)
            if not tracing and not bool((pick.values > float("-inf")).any()):
                return certified, searched  # nothing left to search (non-finite distances): not certified
            for layer, bank in enumerate(self.banks):
                cells = self.fusion_rule.contributors(pick.indices, shapes[layer], self.size)  # (n, count x m)
                per_pick = cells.shape[1] // count
                valid = (pick.values > float("-inf")).unsqueeze(-1).expand(-1, -1, per_pick).reshape(n, -1)
                wanted = valid & ~exact[layer].gather(1, cells)
                values[layer], exact[layer], fresh = self.search_cells(bank, patches[layer], values[layer],
                                                                       exact[layer], cells, wanted)
                searched = searched + fresh
            rounds += 1

    def search_cells(self, bank: PatchBank, patches: torch.Tensor, values: torch.Tensor, exact: torch.Tensor,
                     cells: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``values`` / ``exact`` ``(N, P)`` with the ``wanted`` of ``cells`` ``(N, c)`` searched in the whole
        bank, each once, and the cells searched per image ``(N,)``. Traceable: the cells are chosen
        with ``nonzero`` (in a graph, a length known only when it runs), so an exported file's round
        searches only the open cells of images not yet certified, as ``predict``'s does, and a round
        after all are certified searches none."""
        chosen = torch.zeros_like(values).scatter_add(1, cells, wanted.float()) > 0
        flat = chosen.flatten().nonzero()[:, 0]
        if torch.jit.is_tracing() or flat.numel() > 0:  # else this bank's picked cells are exact already
            # Features may live on the CPU while the bank (and so the distances) live on a GPU.
            fresh = bank.exact(patches[flat.to(patches.device)], self.k).to(values.device)
            values = values.flatten().scatter(0, flat, fresh).view_as(values)
        return values, exact | chosen, chosen.sum(1)

    @torch.no_grad()
    def score(self, feats: list[torch.Tensor], desc: str = "k-NN search") -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` over any number of images, :data:`IMAGES_PER_PASS` at a time (a progress
        bar for long runs); scores and maps come back on the CPU, the search report in
        :attr:`search_stats`."""
        count = feats[0].shape[0]
        scores, maps, certified, searched = [], [], [], []
        with tqdm(total=count, desc=desc, unit="img", leave=False, disable=count <= IMAGES_PER_PASS,
                  dynamic_ncols=True) as bar:
            for start in range(0, count, IMAGES_PER_PASS):
                parts = self.search_maps([f[start:start + IMAGES_PER_PASS] for f in feats])
                for store, part in zip((scores, maps, certified, searched), parts):
                    store.append(part.cpu())
                bar.update(parts[0].shape[0])
        self.search_counts = (torch.cat(certified), torch.cat(searched))  # per image: certified, re-searched
        self.search_stats = search_report(self, *self.search_counts)
        return torch.cat(scores), torch.cat(maps)


def search_report(scorer: AnomalyScorer, certified: torch.Tensor, searched: torch.Tensor) -> dict:
    """What the search did for ``N`` images: whether a coreset was searched, how (``certified``,
    ``uncertified``, ``coreset only``), which map cells are exact, how many image scores are
    certified exact, and the patches re-searched in the whole bank per image (mean and max)."""
    mode = "exact bank" if not scorer.coreset else "certified" if scorer.certify_scores else \
        "uncertified" if scorer.refine > 0 else "coreset only"
    # Which map cells hold the exact bank's distance (the others, a coreset's: an upper bound of it).
    exact = "all" if not scorer.coreset else "the re-searched patches" if scorer.refine > 0 else "none"
    if exact != "all" and scorer.k == 1 and any(bank.cell_starts is not None for bank in scorer.banks):
        exact += " and those whose nearest row is among their coreset row's cell rows (scoring.engine.cells)"
    return {"bank": mode, "exact_map_cells": exact, "images": int(certified.numel()),
            "certified_images": int(certified.sum()),
            "re_searched_per_image_mean": float(searched.float().mean()) if searched.numel() else 0.0,
            "re_searched_per_image_max": int(searched.max()) if searched.numel() else 0}


class AnomalyModel(nn.Module):
    """Network + memory banks: float images ``(N, 3, S, S)`` in [0, 1] -> scores ``(N,)``, maps ``(N, S, S)``."""

    def __init__(self, network: nn.Module, scorer: AnomalyScorer, config: ScoreConfig):
        super().__init__()
        self.network, self.scorer, self.config = network, scorer, config
        self.layers, self.head = list(config.layers), uses_head(config.map_source)
        self.bf16 = config.precision == "bf16"

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(N, 3, S, S)`` -> per layer ``(N, C_l, h_l, w_l)`` (then the head's logits; see
        :func:`scoring.engine.features.pooled_features`)."""
        return pooled_features(self.network, images, self.layers, self.head, view=self.config.view_preprocessing)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer(self.features(images))

    def batched_features(self, images: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Eager :meth:`features` over any number of images, ``config.batch_size`` at a time on
        ``device`` (bfloat16 autocast with ``precision="bf16"``); float32 CPU tensors."""
        return batched_features(self.network, images, self.layers, self.config.batch_size, device, self.bf16,
                                self.head, self.config.view_preprocessing)

    def score_images(self, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager :meth:`forward` over any number of images (batched features, then :meth:`AnomalyScorer.score`)."""
        return self.scorer.score(self.batched_features(images, device))


# -- the exported form ----------------------------------------------------------------------
def prepare_uint8(images: torch.Tensor, frame: Frame, antialias: bool) -> torch.Tensor:
    """uint8 ``(N, H, W, C)``, ``C`` = 1, 3 or 4 (alpha dropped) -> float ``(N, 3, *frame)`` in [0, 1]
    (:func:`data.images.network_input`, as every other way in)."""
    return network_input(images[..., :3].permute(0, 3, 1, 2), frame, antialias)


class ExportModel(nn.Module):
    """What an exported file holds: uint8 ``(N, H, W, C)`` -> ``(scores (N,), maps (N, S, S))``.

    A CPU copy of the :class:`AnomalyModel` in front of which :func:`prepare_uint8` runs; what
    scoring never runs (the classifier, stages past the last scored one) is left out, the search
    is the traceable torch one in float32. The network is kept in the plain NCHW layout: saved
    TorchScript weights come back NCHW, and channels_last inputs against them fall to PyTorch's
    slow convolution (600 ms instead of 30 for wave18 at 64 px); oneDNN then sums in another
    order than ``predict``'s channels_last run (features differ by ~1e-6 relative).
    """

    def __init__(self, model: AnomalyModel):
        super().__init__()
        core = copy.deepcopy(model).eval().to("cpu")
        core.network = core.network.to(memory_format=torch.contiguous_format)
        core.network.requires_grad_(False)  # the exported graph never builds an autograd graph
        last_stage = max(*core.layers, HEAD_STAGES if core.head else 1)
        for name in ("fc", "head", "out", *(f"layer{i}" for i in range(last_stage + 1, 5))):
            setattr(core.network, name, nn.Identity())
        if not core.head:
            core.network.seg_head = None
        for module in core.modules():
            if isinstance(module, BankSearch):
                module.shortlist, module.precision = TorchShortlist(), "fp32"
                module.store_centred()
        self.core, self.size, self.antialias = core, model.config.frame_hw, model.config.antialias
        # A certified coreset adds a third output: which image scores are certified exact.
        self.reports_certified = bool(core.scorer.coreset and core.scorer.certify_scores)

    @property
    def output_names(self) -> list[str]:
        return ["scores", "maps", "certified"] if self.reports_certified else ["scores", "maps"]

    def scratch_elements(self) -> int:
        """Floats one image's scans write into (:attr:`.knn.BankSearch.traced_scratch`): each bank's
        patches per image times its traced group, the largest over banks (searched one after another)."""
        height, width = self.size
        feats = self.core.features(torch.zeros(1, 3, height, width))
        scorer = self.core.scorer
        pairs = list(zip(scorer.banks, scorer.fusion_rule.grids(feats[:scorer.layer_count])))
        if scorer.view is not None:
            pairs += zip(scorer.view.banks, scorer.fusion_rule.grids(feats[-scorer.layer_count:]))
        return max((bank.search.traced_scratch_elements(grid.shape[-2] * grid.shape[-1]) for bank, grid in pairs),
                   default=0)

    def forward(self, images: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """uint8 ``(N, H, W, C)`` -> scores ``(N,)``, maps ``(N, S, S)`` (and certified ``(N,)`` bool).
        With ``scratch`` (:meth:`scratch_elements` floats; TorchScript traces, one image per call) the
        banks' scans write into it instead of fresh memory."""
        feats = self.core.features(prepare_uint8(images, self.size, self.antialias))
        searches = [bank.search for bank in self.core.scorer.all_banks()]
        for search in searches:
            search.traced_scratch = scratch
        try:
            scores, maps, certified, _ = self.core.scorer.search_maps(feats)
        finally:
            for search in searches:
                search.traced_scratch = None
        return (scores, maps, certified) if self.reports_certified else (scores, maps)


def channels_last_batch(images: torch.Tensor) -> torch.Tensor:
    """A TorchScript front's input ``(N, H, W)`` or ``(N, H, W, C)`` -> ``(N, H, W, C)``; an empty batch is
    refused in words (the graph's outputs, joined image by image, would fail with an interpreter error)."""
    if images.dim() == 3:
        images = images.unsqueeze(-1)
    if images.shape[0] == 0:
        raise ValueError("an empty batch (N = 0): give at least one image")
    return images


class AnyRank(nn.Module):
    """TorchScript front of a traced :class:`ExportModel`: also takes grayscale ``(N, H, W)`` batches,
    and runs the graph (traced on one image) image by image, each call's scans writing into one
    scratch tensor of its own (glibc returns a freed block of a few MB to the system and the next
    one faults it back in: ~16,000 page faults per 256 px image without it)."""

    def __init__(self, traced: nn.Module, scratch_elements: int):
        super().__init__()
        self.traced, self.scratch_elements = traced, scratch_elements

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = channels_last_batch(images)
        scratch = torch.empty(self.scratch_elements)
        scores, maps = [], []
        for one in images.split(1):
            score, image_map = self.traced(one, scratch)
            scores.append(score)
            maps.append(image_map)
        return torch.cat(scores), torch.cat(maps)


class AnyRankCertified(AnyRank):
    """:class:`AnyRank` of a file with a certified coreset (TorchScript needs the outputs' count)."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = channels_last_batch(images)
        scratch = torch.empty(self.scratch_elements)
        scores, maps, certified = [], [], []
        for one in images.split(1):
            score, image_map, exact = self.traced(one, scratch)
            scores.append(score)
            maps.append(image_map)
            certified.append(exact)
        return torch.cat(scores), torch.cat(maps), torch.cat(certified)
