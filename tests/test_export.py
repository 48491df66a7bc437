"""Exported detectors score as Detector.predict does, in a process that has nothing of this project."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

import export as export_cli
from common import cli
from scoring import Detector, ScoreConfig
from scoring.export import export, read_metadata

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# Runs in a fresh interpreter whose working directory is outside the project: only torch or
# onnxruntime + NumPy, no import of this project (it must not be importable there).
STANDALONE = textwrap.dedent("""
    import json, sys
    import numpy as np
    try:
        import scoring  # noqa: F401
        raise SystemExit("the project is importable here; the test would prove nothing")
    except ImportError:
        pass
    fmt, images_path = sys.argv[1:3]
    images = np.load(images_path)
    for path in sys.argv[3:]:
        if fmt == "torchscript":
            import torch
            extra = {"metadata.json": ""}
            model = torch.jit.load(path, _extra_files=extra)
            with torch.no_grad():
                outputs = [o.numpy() for o in model(torch.from_numpy(images))]
                gray_scores = model(torch.from_numpy(np.ascontiguousarray(images[..., 0])))[0].numpy()
                try:
                    model(torch.from_numpy(images[:0]))
                    empty = "scored"
                except Exception as error:  # noqa: BLE001 (torch.jit.Error: what a user of the file sees)
                    empty = str(error)
            threshold = json.loads(extra["metadata.json"])["threshold"]
        else:
            import onnxruntime
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            outputs = session.run(None, {"images": images})
            gray_scores = session.run(None, {"images": np.ascontiguousarray(images[..., :1])})[0]
            threshold = json.loads(session.get_modelmeta().custom_metadata_map["threshold"])
            empty = "not checked"  # (ONNX Runtime: a graph cannot say it in words)
        certified = outputs[2] if len(outputs) == 3 else np.ones(len(outputs[0]), bool)  # a certified coreset's
        np.savez(path + ".npz", scores=outputs[0], maps=outputs[1], gray_scores=gray_scores, threshold=threshold,
                 certified=certified, outputs=len(outputs), empty=empty)
""")
VARIANTS = {"concatenation": {}, "multiplication": {"fusion": "multiplication"},
            "coreset": {"coreset": 0.3, "refine": 4, "k": 2}}  # frames: test_one_way_in


def assert_scores_close(got: np.ndarray, expected: np.ndarray, threshold: float) -> None:
    """Within 1e-4 relative, for scores below the threshold relative to the threshold.

    Another convolution library (ONNX Runtime) rounds differently in float32; a small distance
    between two long feature vectors carries that rounding as a larger relative error (seen:
    1.0e-4 on a score 1/3 of the threshold), which says nothing about the verdict.
    """
    scale = np.maximum(np.abs(expected), threshold)
    assert np.all(np.abs(got - expected) <= 1e-4 * scale), (got, expected, threshold)


@pytest.fixture(scope="module")
def images(tiny_root):
    """The tiny set's test images (48 x 40, resized to 32 inside the graph) as uint8 (N, H, W, 3)."""
    paths = sorted((tiny_root / "widget" / "test").rglob("*.png"))
    return paths, np.stack([np.array(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def detectors(trained, tiny_root):
    """The tiny checkpoint's detectors: both fusions, and a coreset bank with refine and k = 2."""
    return {name: Detector.fit(trained / "widget-wave18" / "model.pt", tiny_root / "widget" / "train" / "good",
                               ScoreConfig(batch_size=4, **extra), device="cpu") for name, extra in VARIANTS.items()}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_files_score_as_predict_in_a_fresh_process(fmt, detectors, images, tmp_path):
    paths, arrays = images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = {name: export(detector, fmt, tmp_path / f"{name}.{fmt}") for name, detector in detectors.items()}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    np.save(outside / "images.npy", arrays)
    (outside / "run.py").write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "run.py", fmt, "images.npy", *map(str, files.values())], cwd=outside,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, detector in detectors.items():
        got = np.load(f"{files[name]}.npz")
        expected = detector.predict(paths)
        assert_scores_close(got["scores"], expected.scores, detector.threshold)
        np.testing.assert_allclose(got["maps"], expected.maps, rtol=1e-3, atol=1e-3)
        # Grayscale input: the one channel is repeated, as the Python pipeline does.
        gray = detector.predict([a[..., 0] for a in arrays])
        assert_scores_close(got["gray_scores"], gray.scores, detector.threshold)
        assert float(got["threshold"]) == pytest.approx(detector.threshold)
        # A certified coreset's file says so per image (third output); the others keep two outputs.
        assert int(got["outputs"]) == (3 if name == "coreset" else 2) and got["certified"].all()
        if fmt == "torchscript":  # an empty batch is refused in words, both fronts (two and three outputs)
            assert "an empty batch (N = 0)" in str(got["empty"])
        meta = read_metadata(files[name], fmt)
        assert meta["size"] == 32 and meta["config"]["fusion"] == detector.config.fusion
        assert meta["frame"] == list(detector.frame) and got["maps"].shape[1:] == detector.frame
        assert meta["provenance"]["arch"] == "wave18"


def test_export_command_checks_its_output_and_refuses_to_replace(detectors, trained, tmp_path, capsys):
    detector_file = detectors["concatenation"].save(tmp_path / "d.pt")
    out = tmp_path / "w.onnx"

    def run(*argv):
        with pytest.raises(SystemExit) as exit_info:
            cli.run(export_cli.main, export_cli.get_args_parser().parse_args(list(argv)))
            raise SystemExit(0)
        return exit_info.value.code, capsys.readouterr()

    code, printed = run("--detector", str(detector_file), "--format", "onnx", "--out", str(out))
    assert code == 0 and "scores within" in printed.out and out.stat().st_size > 0
    before = out.read_bytes()
    code, printed = run("--detector", str(detector_file), "--format", "onnx", "--out", str(out))
    assert code == 2 and "--overwrite" in printed.err and out.read_bytes() == before
    code, printed = run("--detector", str(trained / "widget-wave18" / "model.pt"), "--format", "torchscript",
                        "--out", str(tmp_path / "x.ts"))
    assert code == 2 and "not a detector file" in printed.err and not (tmp_path / "x.ts").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary files left beside the outputs


def test_exported_graph_takes_any_batch_and_image_size(detectors, tmp_path):
    detector = detectors["concatenation"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export(detector, "onnx", tmp_path / "w.onnx")
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 32, 32, 3), (3, 61, 45, 3), (2, 100, 120, 1)]:
        batch = rng.integers(0, 256, shape).astype(np.uint8)
        scores, maps = session.run(None, {"images": batch})
        assert scores.shape == (shape[0],) and maps.shape == (shape[0], 32, 32)
        expected = detector.predict(list(batch[..., 0] if shape[3] == 1 else batch)).scores
        # Pure noise resized by another library: a resized value near .5 may round the other way
        # (1/255 on a pixel), which moves a score by up to ~2e-4 here; real images stay within 1e-4.
        np.testing.assert_allclose(scores, expected, rtol=1e-3)
    assert json.loads(session.get_modelmeta().custom_metadata_map["threshold"]) == pytest.approx(detector.threshold)
