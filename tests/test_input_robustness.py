"""Inputs from outside MVTec: 0/1 and 1-bit masks, masks left in test folders, empty --c,
EXIF-rotated phone pictures, huge 16-bit and float images read without gigabytes of floats."""

import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data.images as images
from common import cli
from common.errors import UserError
from data import TestSet, read_mask, read_rgb, resolve_categories
from data.images import read_gray, resize_mask
from data.mvtec import test_samples as list_test_samples

EXIF_ORIENTATION = 0x0112


@pytest.fixture
def widget(tiny_root, tmp_path):
    """A private copy of the tiny ``widget`` category, free to modify."""
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "widget", root / "widget")
    return root


def masks_of(root):
    ds = TestSet(root, "widget", 32)
    return [ds[i]["mask"] for i in range(len(ds))]


# A. masks stored as 0/1 ---------------------------------------------------------------------

@pytest.mark.parametrize("store", ["uint8 0/1", "1-bit", "16-bit 0/1"])
def test_binary_masks_read_as_defective(widget, store):
    reference = masks_of(widget)
    assert all(m.any() for m in reference[3:])  # the three scratch images
    for path in sorted((widget / "widget" / "ground_truth" / "scratch").glob("*_mask.png")):
        binary = np.asarray(Image.open(path)) >= 128
        if store == "uint8 0/1":
            Image.fromarray(binary.astype(np.uint8)).save(path)
        elif store == "1-bit":
            Image.fromarray(binary).convert("1").save(path)
            assert Image.open(path).mode == "1"
        else:
            Image.fromarray(binary.astype(np.uint16)).save(path)
            assert Image.open(path).mode.startswith("I")
        assert int(read_gray(path).max()) in (1, 255) and int(read_mask(path).max()) == 255
    got = masks_of(widget)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_soft_and_empty_masks_unchanged(tmp_path):
    soft = np.array([[0, 1, 1], [100, 127, 200]], np.uint8)  # has 1s, but its maximum is 200
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert read_mask(tmp_path / "soft.png").tolist() == soft.tolist()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "empty.png")
    assert not resize_mask(read_mask(tmp_path / "empty.png"), 3).any()


# B. mask files inside test folders ----------------------------------------------------------

def test_mask_named_files_in_test_folders_skipped(widget, capsys):
    stray = widget / "widget" / "test" / "good" / "000_mask.png"
    shutil.copy(widget / "widget" / "ground_truth" / "scratch" / "000_mask.png", stray)
    shutil.copy(stray, widget / "widget" / "test" / "scratch" / "001_mask.png")
    samples = list_test_samples(widget, "widget")
    assert len(samples) == 6 and not any(s.path.stem.endswith("_mask") for s in samples)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "skipped 2 mask file(s)" in err[0] and "good/000_mask.png" in err[0]
    assert "scratch/001_mask.png" in err[0] and "ground_truth" in err[0]
    assert len(TestSet(widget, "widget", 32)) == 6


# C. --c naming nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["", ",", " , "])
def test_empty_category_spec_is_an_error(tiny_root, spec):
    with pytest.raises(UserError, match=r"^category='.*': no category named; pass a category "
                                        r"\(found: gizmo, widget\) or 'all'$") as info:
        resolve_categories(tiny_root, spec)
    assert cli.setting_message(info.value, {"category": "--c"}).startswith(f"--c {spec}: no category named")


# D. EXIF orientation -------------------------------------------------------------------------

def save_with_orientation(array: np.ndarray, path, orientation: int, **kwargs) -> None:
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = orientation
    img.save(path, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_png(tmp_path, orientation):
    arr = np.random.default_rng(orientation).integers(0, 255, (30, 20, 3)).astype(np.uint8)
    save_with_orientation(arr, tmp_path / "x.png", orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "x.png")))
    got = read_rgb(tmp_path / "x.png").permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)
    if orientation == 6:  # "rotate 90 clockwise to view": the stored 20x30 picture is shown 30x20
        assert np.array_equal(got, np.rot90(arr, -1))


def test_exif_orientation_applied_jpeg_and_gray(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (30, 20, 3)).astype(np.uint8)
    save_with_orientation(arr, tmp_path / "tagged.jpg", 6, quality=95)
    Image.fromarray(arr).save(tmp_path / "plain.jpg", quality=95)  # the same pixels, no tag
    plain = read_rgb(tmp_path / "plain.jpg").permute(1, 2, 0).numpy()
    assert np.array_equal(read_rgb(tmp_path / "tagged.jpg").permute(1, 2, 0).numpy(), np.rot90(plain, -1))
    gray = arr[..., 0]
    save_with_orientation(gray, tmp_path / "mask.png", 8)
    assert np.array_equal(read_gray(tmp_path / "mask.png").numpy(), np.rot90(gray, 1))


def test_rotated_phone_image_fits_its_upright_mask(widget):
    """The image is stored sideways with Orientation 6, its mask upright: they fit, as a viewer shows."""
    image = widget / "widget" / "test" / "scratch" / "000.png"
    upright = np.asarray(Image.open(image))  # 48 x 40
    reference = TestSet(widget, "widget", 32)[3]
    sideways = np.rot90(upright, 1)  # what the camera stored: 40 x 48, to be turned clockwise
    save_with_orientation(np.ascontiguousarray(sideways), image, 6)
    item = TestSet(widget, "widget", 32)[3]  # read without a "mask ... another aspect ratio" error
    assert item["path"] == str(image)
    assert torch.equal(item["image"], reference["image"]) and torch.equal(item["mask"], reference["mask"])


# E. huge 16-bit and float images --------------------------------------------------------------

def reference_8bit(arr: np.ndarray, high: float, target: int) -> np.ndarray:
    """The 8-bit pipeline's answer: scale to uint8 at full size, then PIL's box reduce as for L images."""
    full = np.clip(np.rint(arr.astype(np.float64) / high * 255), 0, 255).astype(np.uint8)
    factor = min(arr.shape) // (4 * target)
    return np.array(Image.fromarray(full).reduce(factor))


@pytest.mark.parametrize("kind", ["I;16", "F"])
def test_wide_images_reduced_like_8bit(tmp_path, kind):
    rng = np.random.default_rng(0)
    target = 8
    if kind == "I;16":
        arr = rng.integers(0, 65535, (230, 170)).astype(np.uint16)  # not multiples of the factor
        path, high = tmp_path / "x.png", 65535.0
    else:
        arr = rng.random((230, 170)).astype(np.float32)
        path, high = tmp_path / "x.tif", 1.0
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode == kind
    got = read_rgb(path, target)
    ref = reference_8bit(arr, high, target)
    assert got.shape == (3, *ref.shape)  # reduced by 170 // 32 = 5, as an 8-bit image would be
    assert int((got[0].int() - torch.from_numpy(ref).int()).abs().max()) <= 1
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


def test_16bit_read_never_makes_a_full_size_float_array(tmp_path, monkeypatch):
    arr = np.random.default_rng(0).integers(0, 65535, (1200, 1000)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "big.png")
    full_float64 = arr.size * 8  # 9.6 MB: what the old conversion allocated, several times over
    monkeypatch.setattr(images, "STRIP_PIXELS", 50_000)
    for target in (32, None):  # reduced (PIL, in strips), and full size (numpy, in strips)
        tracemalloc.start()
        out = read_rgb(tmp_path / "big.png", target)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 0.75 * full_float64, (target, peak)  # numpy allocations only; the old code: > 3x
        assert out.shape[1:] == ((1200 // 7 + 1, 1000 // 7 + 1) if target else (1200, 1000))
    full = read_rgb(tmp_path / "big.png")[0].numpy()
    assert np.array_equal(full, np.clip(np.rint(arr / 65535 * 255), 0, 255).astype(np.uint8))
