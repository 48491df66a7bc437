"""Learning-rate schedules, the rotation/flip option and named recipes."""

import math

import pytest
import torch

import main as train_main
from common.errors import SettingError
from common.recipes import RECIPES, check_recipe, recipe_flags, train_overrides
from data import TrainSet
from scoring import ScoreConfig
from scoring.pipeline import cli as score_cli
from training import TrainConfig
from training.loop import lr_at, schedule_note


def test_constant_schedule_is_the_paper():
    config = train_main.config_from_args(train_main.parse_args([]))
    assert config == TrainConfig() and config.sched == "constant" and config.recipe == "paper"
    assert all(lr_at(e, config) == 0.03 for e in range(0, 1600, 100))


def test_cosine_with_warmup():
    config = train_main.config_from_args(
        train_main.parse_args(["--sched", "cosine", "--warmup", "2", "--e", "10", "--lr", "0.1"]))
    assert config == TrainConfig(sched="cosine", warmup=2, epochs=10, lr=0.1)
    lrs = [lr_at(e, config) for e in range(10)]
    assert math.isclose(lrs[0], 0.05) and math.isclose(lrs[1], 0.1)
    assert math.isclose(lrs[2], 0.1) and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] > 0


@pytest.mark.parametrize("epochs", [1, 2, 3, 4])
def test_a_cosine_schedule_too_short_to_decay_is_warned_of(epochs):
    config = TrainConfig(sched="cosine", warmup=2, epochs=epochs, lr=0.1)
    decays = min(lr_at(e, config) for e in range(epochs)[2:]) < 0.1 if epochs > 2 else False
    note = schedule_note(config)
    assert (note is None) == decays  # warned exactly where the rate never falls below --lr
    if note:
        assert "--warmup 2" in note and f"--e {epochs}" in note and "4 epochs" in note
    assert schedule_note(TrainConfig(warmup=5, epochs=1)) is None  # constant: no decay was asked for


def test_recipe_sets_defaults_but_flags_win():
    best_train, _ = recipe_flags("best")
    args = train_main.parse_args(["--recipe", "best"])
    for key, value in RECIPES["best"]["train"].items():
        assert getattr(args, key) == value
    if "--sched" in best_train:
        assert train_main.parse_args(["--recipe", "best", "--sched", "constant"]).sched == "constant"
    score_args = score_cli.parse_args("concatenation", ["--recipe", "best"])
    for key, value in RECIPES["best"]["score"].items():
        assert getattr(score_args, key) == value
    assert score_cli.parse_args("concatenation", ["--recipe", "best", "--k", "7"]).k == 7


def test_recipe_whole_share_yields_to_a_square_frame_but_a_given_share_does_not():
    """`--recipe best --frame square` (the paper's view) trains as before: the recipe's share of whole
    images means nothing there and is dropped; a share the user asks for is still refused with it."""
    share = RECIPES["best"]["train"].get("whole_share", 0)
    assert train_main.parse_args(["--recipe", "best"]).whole_share == share
    args = train_main.parse_args(["--recipe", "best", "--frame", "square"])
    assert args.whole_share == 0 and train_main.config_from_args(args).whole_share == 0
    assert train_main.parse_args(["--recipe", "best", "--frame", "320x160"]).whole_share == share
    given = train_main.parse_args(["--recipe", "best", "--frame", "square", "--whole-share", "0.5"])
    assert given.whole_share == 0.5
    with pytest.raises(SettingError, match="whole_share"):
        train_main.config_from_args(given)


def test_demo_defaults_and_given_flags_win():
    args = train_main.parse_args(["--demo", "--e", "3"])
    assert args.data_root == "demo_data" and args.arch == "wave18" and args.epochs == 3 and args.eval


def test_rotflip_gives_symmetries_of_the_image(tiny_root):
    plain = TrainSet(tiny_root, "gizmo", 32, ["cutpaste"], seed=0)
    turned = TrainSet(tiny_root, "gizmo", 32, ["cutpaste"], seed=0, rotflip=True)
    image = plain.image(0)
    symmetries = [torch.rot90(image, k, (1, 2)).flip(2) if m else torch.rot90(image, k, (1, 2))
                  for k in range(4) for m in (0, 1)]
    seen = set()
    for epoch in range(12):
        turned.set_epoch(epoch)
        normal, _ = turned[0]
        matches = [i for i, s in enumerate(symmetries) if torch.equal(normal, s)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 2


def test_demo_with_a_recipe_takes_the_recipes_settings():
    """--demo and a recipe may set the same key (batch size): the recipe wins, given flags still win."""
    for name, recipe in RECIPES.items():
        args = train_main.parse_args(["--demo", "--recipe", name])
        assert args.data_root == "demo_data" and args.recipe == name
        for key, value in recipe["train"].items():
            assert getattr(args, key) == value
    assert train_main.parse_args(["--demo", "--recipe", "best", "--b", "5"]).batch_size == 5


def test_recipes_are_overrides_of_the_configs():
    for name in RECIPES:
        config = TrainConfig(**train_overrides(name))
        assert train_main.config_from_args(train_main.parse_args(["--recipe", name])) == config.replace(recipe=name)
        ScoreConfig(**RECIPES[name]["score"])
    assert TrainConfig(**train_overrides("best")).augs == ("cutpaste", "perlin", "scar", "shapes")


@pytest.mark.parametrize("recipe,message", [
    ({"train": {"learning_rate": 0.1}, "score": {}}, "train has no setting learning_rate"),
    ({"train": {}, "score": {"neighbours": 3}}, "score has no setting neighbours"),
    ({"train": {"augs": "cutpaste,scar"}, "score": {}}, "augs='cutpaste,scar' is a str"),
    ({"train": {"sched": "linear"}, "score": {}}, "sched=.linear.: choose one of constant, cosine"),
    ({"train": {}}, "needs exactly the keys"),
])
def test_a_recipe_that_names_no_setting_is_refused(recipe, message):
    with pytest.raises(ValueError, match=message):
        check_recipe("mine", recipe)
