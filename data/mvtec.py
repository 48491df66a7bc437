"""MVTec-AD-layout data sets: category discovery, the training set with synthetic anomalies,
and the labelled test set.

Layout (MVTec AD and most industrial data sets)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<good|defect>/*.png
    ROOT/<category>/ground_truth/<defect>/<stem>_mask.png

Images are decoded and resized once and cached in memory as uint8 (the data sets are small),
so an epoch never decodes the same file twice. Synthetic anomalies are made by
:func:`augment.make_anomalies` from a ``torch.Generator`` (``rng``) seeded by
``(seed, epoch, index)``: the same seed gives the same anomalies and batches whatever the number
of loader workers or processes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import augment
from augment import make_anomalies, other_index, sample_seed
from common.errors import SettingError, UserError

from .frames import Frame, as_frame, random_tiles, whole_draws
from .images import (
    is_mask_name,
    list_images,
    load_image,
    network_input,
    read_mask,
    read_rgb,
    resize_mask,
    resize_mask_paper,
    to_float,
)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
# Above this many bytes of decoded, resized uint8 images, load from disk on every access.
CACHE_LIMIT_BYTES = 8 * 1024**3


def find_categories(root: str | Path) -> list[str]:
    """Sub-folders of ``root`` that hold ``train/good`` (MVTec's 15 first, in their order)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"data root {root} does not exist: download MVTec AD from {MVTEC_URL} and unpack it "
            f"there, or pass --data-root DIR holding <category>/train/good, <category>/test/<type>, "
            f"<category>/ground_truth/<type>")
    found = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not found:
        raise UserError(f"data root {root} has no <category>/train/good folders; expected the "
                        f"MVTec AD layout (see {MVTEC_URL}) or pass the right --data-root")
    ordered = [c for c in MVTEC_CATEGORIES if c in found]
    return ordered + [c for c in found if c not in ordered]


def resolve_categories(root: str | Path, spec: str) -> list[str]:
    """``--c`` value (``all``, one name, or a comma list) -> category names, checked to exist (a name
    given twice counts once: ``tiny,tiny`` trains and scores ``tiny`` once)."""
    found = find_categories(root)
    if spec == "all":
        return found
    asked = list(dict.fromkeys(c.strip() for c in spec.split(",") if c.strip()))
    if not asked:
        raise SettingError("category", spec, f"no category named; pass a category (found: {', '.join(found)}) or "
                                             "'all'")
    missing = [c for c in asked if c not in found]
    if missing:
        raise SettingError("category", spec, f"no category {', '.join(missing)} under {root} "
                                             f"(found: {', '.join(found)})")
    return asked


def train_images(root: str | Path, category: str) -> list[Path]:
    folder = Path(root) / category / "train" / "good"
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{folder} holds no images (png/jpg/bmp/tif); put the defect-free "
                        "training images there")
    return paths


@dataclass(frozen=True)
class TestSample:
    __test__ = False  # not a pytest class
    path: Path
    label: int  # 0 good, 1 defect
    defect: str
    mask_path: Path | None


def find_mask(root: Path, category: str, defect: str, image: Path) -> Path | None:
    """``ground_truth/<defect>/<stem>_mask.*`` (MVTec) or ``<stem>.*``; ``None`` if absent."""
    folder = root / category / "ground_truth" / defect
    for candidate in list_images(folder):
        if candidate.stem in (f"{image.stem}_mask", image.stem):
            return candidate
    return None


def has_pixel_labels(root: str | Path, category: str) -> bool:
    """Whether the category's test set is labelled per pixel (it has a ``ground_truth`` folder);
    without one it is labelled per image only (``test/<defect>/``), as many real sets come."""
    return (Path(root) / category / "ground_truth").is_dir()


def test_samples(root: str | Path, category: str) -> list[TestSample]:
    """All test images with labels; a defect image without a mask is a ``UserError`` where the
    category has a ``ground_truth`` folder (without one, the labels are per image: no masks).

    Files named like masks (``<stem>_mask.*``) inside ``test/<type>`` are skipped with one
    warning line: they are ground truth put in the wrong folder, not test images.
    """
    root = Path(root)
    test_dir = root / category / "test"
    defects = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    if not defects:
        raise UserError(f"{test_dir} has no sub-folders; expected test/good and test/<defect type>")
    samples, masks_found = [], []
    pixel_labels = has_pixel_labels(root, category)
    for defect in defects:
        for path in list_images(test_dir / defect):
            if is_mask_name(path):
                # A mask copied next to its image would be scored as one more test image.
                masks_found.append(path.relative_to(test_dir).as_posix())
                continue
            if defect == "good":
                samples.append(TestSample(path, 0, defect, None))
                continue
            mask = find_mask(root, category, defect, path) if pixel_labels else None
            if mask is None and pixel_labels:
                raise UserError(f"defect image {path} has no mask: expected "
                                f"{root / category / 'ground_truth' / defect / (path.stem + '_mask.png')}")
            samples.append(TestSample(path, 1, defect, mask))
    if masks_found:
        shown = ", ".join(masks_found[:5]) + (f" and {len(masks_found) - 5} more" if len(masks_found) > 5 else "")
        tqdm.write(f"warning: {test_dir}: skipped {len(masks_found)} mask file(s) named *_mask ({shown}); "
                   f"masks belong in {root / category / 'ground_truth'}/<type>/", file=sys.stderr)
    if not samples:
        raise UserError(f"{test_dir} holds no images")
    return samples


def check_mask_fits(image_path: Path, image_hw: tuple[int, int], mask_path: Path,
                    mask_hw: tuple[int, int]) -> None:
    """A mask may be scaled, but must have its image's aspect ratio (within 1%)."""
    (ih, iw), (mh, mw) = image_hw, mask_hw
    if abs(ih * mw - iw * mh) > 0.01 * ih * mw:
        raise UserError(f"mask {mask_path} is {mh}x{mw} but image {image_path} is {ih}x{iw} (height x width: "
                        "another aspect ratio); fix or replace the mask")


def load_cached(paths: list[Path], size: int | Frame, antialias: bool, desc: str) -> torch.Tensor | None:
    """Decode + resize every path into one ``(N, 3, H, W)`` uint8 tensor (``size``: a square side or a
    frame ``(H, W)``), or ``None`` if too big."""
    height, width = as_frame(size)
    if len(paths) * 3 * height * width > CACHE_LIMIT_BYTES:
        return None
    images = torch.empty(len(paths), 3, height, width, dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc=desc, leave=False, unit="img", disable=len(paths) < 50)):
        images[i] = load_image(path, size, antialias)
    return images


class TrainSet(Dataset):
    """Normal training images, each with one synthetic anomaly per selected anomaly maker.

    ``dataset[i]`` is ``(normal (3, S, S) float, anomalies (G, 3, S, S) float)``, with
    ``masks (G, S, S) bool`` as a third element when ``with_masks`` (dense self-supervision);
    maker ``g`` of ``augs`` is class ``g + 1``. Call ``set_epoch(e)`` before each epoch.

    Images are resized to ``frame`` ``(H, W)`` (default ``(size, size)``, the paper). A larger frame
    trains on tiles: each sample is a random ``size x size`` tile of its frame-sized image (and each
    anomaly source a random tile of another image), so the anomalies are made per tile. With
    ``whole_share`` > 0 each sample is, with that probability, the whole image resized to
    ``size x size`` instead (the paper's view of it), and its anomaly sources are whole images too.
    """

    def __init__(self, root: str | Path, category: str, size: int, augs: list[str], seed: int = 0,
                 antialias: bool = False, cache: bool = True, rotflip: bool = False, with_masks: bool = False,
                 frame: Frame | None = None, whole_share: float = 0.0):
        self.paths = train_images(root, category)
        self.size, self.augs, self.seed, self.antialias = size, augs, seed, antialias
        self.frame = as_frame(frame or size)
        self.rotflip, self.with_masks = rotflip, with_masks
        self.makers = [augment.MAKERS[name] for name in augs]
        self.epoch = 0
        self.images = load_cached(self.paths, self.frame, antialias, f"{category}: caching train") if cache else None
        # A square frame's tile is already the whole image: no draws, the paper's stream.
        self.whole_share = whole_share if self.frame != (size, size) else 0.0
        self.wholes = load_cached(self.paths, size, antialias, f"{category}: caching whole") \
            if cache and self.whole_share > 0 else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, index: int) -> torch.Tensor:
        """``(3, H, W)`` float in [0, 1]: the whole frame-sized image."""
        return self._decoded(self.images, index, self.frame)

    def _decoded(self, cache: torch.Tensor | None, index: int, size: int | Frame) -> torch.Tensor:
        """Image ``index`` at ``size`` as float in [0, 1]: from ``cache`` (uint8, the set's images at
        that size) when there is one, else read from its file."""
        return to_float(cache[index] if cache is not None else load_image(self.paths[index], size, self.antialias))

    def tile(self, index: int, rng: torch.Generator) -> torch.Tensor:
        """``(3, S, S)`` float: image ``index`` itself (square frame, drawing nothing from ``rng``) or a
        random tile of it."""
        return random_tiles(self.image(index)[None], self.size, rng)[0]

    def whole(self, index: int) -> torch.Tensor:
        """``(3, S, S)`` float: image ``index`` resized whole to ``size x size``."""
        return self._decoded(self.wholes, index, self.size)

    def view(self, index: int, whole: bool, rng: torch.Generator) -> torch.Tensor:
        """``(3, S, S)``: image ``index`` whole or as a random tile (:meth:`tile`)."""
        return self.whole(index) if whole else self.tile(index, rng)

    def sample(self, index: int, epoch: int | None = None,
               seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training sample ``index`` of ``epoch`` under ``seed`` (default: the set's own):
        ``(normal, anomalies (G, 3, S, S), masks (G, S, S) bool)``; each source is another
        random training image, as in the paper."""
        epoch = self.epoch if epoch is None else epoch
        rng = torch.Generator().manual_seed(sample_seed(self.seed if seed is None else seed, epoch, index))
        whole = bool(whole_draws(1, self.whole_share, rng)[0])
        normal = self.view(index, whole, rng)
        return make_anomalies(normal, self.makers,
                              lambda rng: self.view(other_index(index, len(self), rng), whole, rng), rng,
                              self.rotflip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        normal, anomalies, masks = self.sample(index)
        return (normal, anomalies, masks) if self.with_masks else (normal, anomalies)


class TestSet(Dataset):
    """Labelled test images: ``dataset[i]`` is a dict with ``image`` (3, H, W) float, ``mask``
    (H, W) bool, ``label`` int, ``path`` str, ``defect`` str; ``frame`` is what images are resized
    to, ``(H, W)`` (:mod:`data.frames`; a square side ``S`` is ``(S, S)``), through the one way in
    (:func:`data.images.network_input`)."""

    __test__ = False  # not a pytest class

    def __init__(self, root: str | Path, category: str, frame: int | Frame, antialias: bool = False):
        self.samples = test_samples(root, category)
        self.pixel_labels = has_pixel_labels(root, category)  # False: image labels only, masks all empty
        self.frame, self.antialias = as_frame(frame), antialias

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        raw = read_rgb(sample.path, min(self.frame))
        if sample.mask_path is not None:
            soft = read_mask(sample.mask_path)
            check_mask_fits(sample.path, tuple(raw.shape[-2:]), sample.mask_path, tuple(soft.shape))
            mask, paper_mask = resize_mask(soft, self.frame), resize_mask_paper(soft, self.frame)
        else:
            mask = paper_mask = torch.zeros(self.frame, dtype=torch.bool)
        return {"image": network_input(raw[None], self.frame, self.antialias)[0], "mask": mask,
                "paper_mask": paper_mask,
                "label": sample.label, "path": str(sample.path), "defect": sample.defect}
