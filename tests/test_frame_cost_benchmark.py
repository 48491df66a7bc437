"""benchmarks/frame_cost.py on the tiny data set: its three rows, timed in alternating rounds, and the
certified coreset's image scores equal to the exact bank's at the same (non-square) frame."""

import json

import pytest

from benchmarks import frame_cost


def test_frame_cost_rows_rounds_and_certified_scores(one_epoch, tiny_root, tmp_path):
    argv = ["--checkpoint", str(one_epoch / "widget-wave18" / "model.pt"), "--data-root", str(tiny_root),
            "--c", "widget", "--frame", "64x32", "--coresets", "0.5", "--cells", "0,16", "--exact", "--repeats", "2",
            "--out", str(tmp_path)]
    frame_cost.main(frame_cost.get_args_parser().parse_args(argv))
    result = json.loads((tmp_path / "frame_cost_widget.json").read_text())
    paper, exact, coreset, cells = result["rows"]
    assert coreset["scoring"] == "frame, coreset 0.5 certified"
    assert cells["scoring"] == "frame, coreset 0.5 certified, cells 16"
    assert result["info"]["repeats"] == 2 and (tmp_path / "frame_cost_widget.md").is_file()
    assert (paper["frame"], exact["frame"], coreset["frame"]) == ("32x32", "64x32", "64x32")
    assert paper["x paper"] == "1.00" and paper["x paper by round"] == "1.00-1.00"
    for row in (exact, coreset, cells):
        low, high = (float(v) for v in row["x paper by round"].split("-"))
        assert 0 < low <= high
        total = float(row["features ms / img"]) + float(row["k-NN ms / img"])
        assert abs(total - float(row["total ms / img"])) < 0.11
    # A smaller bank searched; every image score certified, so image AUROC is the exact bank's.
    assert int(coreset["bank rows searched"]) < int(exact["bank rows searched"])
    for row in (coreset, cells):
        assert row["certified"] == "6/6" and row["image AUROC"] == exact["image AUROC"]


def test_frame_cost_scores_each_set_of_stages_with_its_own_features(one_epoch, tiny_root, tmp_path):
    argv = ["--checkpoint", str(one_epoch / "widget-wave18" / "model.pt"), "--data-root", str(tiny_root),
            "--c", "widget", "--frame", "64x32", "--coresets", "0.5", "--cells", "0", "--layers", "2,3", "2",
            "--repeats", "1", "--out", str(tmp_path)]
    frame_cost.main(frame_cost.get_args_parser().parse_args(argv))
    paper, both, second = json.loads((tmp_path / "frame_cost_widget.json").read_text())["rows"]
    assert both["scoring"] == "frame, coreset 0.5 certified"
    assert second["scoring"] == "frame, coreset 0.5 certified, layers 2"
    # The same patches (layer 2's grid), so the same coreset size; other features, so other scores.
    assert second["bank rows searched"] == both["bank rows searched"] and second["certified"] == "6/6"
    assert (second["image AUROC"], second["pixel AUROC"]) != (both["image AUROC"], both["pixel AUROC"])


def test_frame_cost_refuses_a_set_of_stages_it_cannot_read(capsys):
    with pytest.raises(SystemExit):
        frame_cost.get_args_parser().parse_args(["--checkpoint", "x.pt", "--data-root", ".", "--c", "w",
                                                 "--layers", "2,3", "2,x"])
    assert "'2,x' is not a comma list of stage numbers" in capsys.readouterr().err


def test_frame_cost_refuses_no_timing_rounds(tmp_path):
    args = frame_cost.get_args_parser().parse_args(
        ["--checkpoint", "x.pt", "--data-root", str(tmp_path), "--c", "widget", "--repeats", "0"])
    with pytest.raises(SystemExit, match="--repeats 0"):
        frame_cost.main(args)


def test_cell_lists_benchmark_times_both_ways_and_they_agree(one_epoch, tiny_root, tmp_path):
    from benchmarks import cell_lists

    argv = ["--checkpoint", str(one_epoch / "widget-wave18" / "model.pt"), "--data-root", str(tiny_root),
            "--c", "widget", "--coreset", "0.5", "--cells", "16", "--repeats", "2", "--out", str(tmp_path)]
    cell_lists.main(cell_lists.get_args_parser().parse_args(argv))
    result = json.loads((tmp_path / "cell_lists_widget.json").read_text())
    ranked, every = result["rows"]
    assert (ranked["cell rows"], every["cell rows"]) == ("ranked", "every row")
    assert every["values equal to every row's"] == "100.00%"
    for row in (ranked, every):
        assert len(row["rounds"].split(" / ")) == 2 and float(row["ms / test image (median)"]) > 0
    # The tiny network's patches: the lowest 8 of 16 ranked rows nearly always hold the nearest.
    assert float(ranked["values equal to every row's"].rstrip("%")) > 90
    assert abs(float(ranked["pixel AUROC"]) - float(every["pixel AUROC"])) < 0.01


def test_frame_cost_square_view_rows_keep_the_maps_and_take_the_views_image_scores(one_epoch, tiny_root, tmp_path):
    argv = ["--checkpoint", str(one_epoch / "widget-wave18" / "model.pt"), "--data-root", str(tiny_root),
            "--c", "widget", "--frame", "64x32", "--coresets", "0.5", "--cells", "16", "--repeats", "1",
            "--square-view", "--out", str(tmp_path)]
    frame_cost.main(frame_cost.get_args_parser().parse_args(argv))
    paper, frame, viewed = json.loads((tmp_path / "frame_cost_widget.json").read_text())["rows"]
    assert viewed["scoring"] == frame["scoring"] + ", square view" and viewed["frame"] == "64x32"
    assert (viewed["pixel AUROC"], viewed["AUPRO"]) == (frame["pixel AUROC"], frame["AUPRO"])  # the frame's maps
    assert viewed["certified"] == "6/6"  # the view's image scores, certified
    # Its features: the frame's pass and a 32 x 32 one (the view's costs are counted, not left out).
    assert float(viewed["features ms / img"]) > 0 and float(viewed["total ms / img"]) > 0
