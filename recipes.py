"""Named recipes: overrides of the training and scoring settings. ``paper`` is the paper's protocol.

A recipe is ``{"train": {TrainConfig field: value}, "score": {ScoreConfig field: value}}``; its
keys and values are checked against the two dataclasses when this module is imported. On the
command line a recipe only changes defaults: any flag given still wins, and the checkpoint
records the recipe it was trained with (``recipe`` key). In Python::

    config = TrainConfig(**train_overrides("best"))     # or TrainConfig().replace(**...)

See README "Results" for what ``best`` was chosen on and what it gains.
"""

from __future__ import annotations

import dataclasses

from scoring.config import ScoreConfig
from training.config import TrainConfig

RECIPES: dict[str, dict[str, dict]] = {
    "paper": {"train": {}, "score": {}},
    # Magnetic Tile, wave18, 128 px, 20 epochs, 3 seeds (README "Results"): 0.943 +- 0.004 image /
    # 0.743 +- 0.005 pixel AUROC (concatenation) against 0.805 +- 0.058 / 0.690 +- 0.002 for the
    # paper protocol. Warm-up + cosine and the scar class were picked on seed 0 and confirmed on
    # seeds 1-2; batch 16 (twice the SGD steps over the same images, no more training time here)
    # was picked by the label-free synthetic check, which prefers it on every seed and fusion.
    # The check prefers no smoothing and k = 1, so the scoring stays the paper's.
    "best": {
        "train": {"sched": "cosine", "warmup": 2, "augs": ("cutpaste", "perlin", "scar"), "batch_size": 16},
        "score": {},
    },
    # Dense self-supervision on the paper protocol: a segmentation head learns each synthetic
    # anomaly's mask beside the classifier; scoring fuses its map with the k-NN map (docs/results.md).
    "dense": {"train": {"dense": True}, "score": {"map_source": "fused"}},
}

STAGES = {"train": TrainConfig, "score": ScoreConfig}


def check_recipe(name: str, recipe: dict) -> None:
    """A ``ValueError`` unless ``recipe`` overrides only fields of the two configs, with values they take."""
    if set(recipe) != set(STAGES):
        raise ValueError(f"recipe {name!r}: needs exactly the keys {sorted(STAGES)}, has {sorted(recipe)}")
    for stage, config in STAGES.items():
        fields = {f.name: f for f in dataclasses.fields(config)}
        unknown = sorted(set(recipe[stage]) - set(fields))
        if unknown:
            raise ValueError(f"recipe {name!r}: {stage} has no setting {', '.join(unknown)} "
                             f"(the {config.__name__} fields are {', '.join(fields)})")
        for key, value in recipe[stage].items():
            default = fields[key].default
            if default is not None and type(value) is not type(default) and \
                    not (isinstance(default, float) and isinstance(value, int)):
                raise ValueError(f"recipe {name!r}: {stage} {key}={value!r} is a {type(value).__name__}, "
                                 f"the setting a {type(default).__name__}")
        config(**recipe[stage])  # the config's own checks (allowed values)


def train_overrides(name: str) -> dict:
    """The training settings recipe ``name`` changes (``{TrainConfig field: value}``)."""
    return dict(RECIPES[name]["train"])


def score_overrides(name: str) -> dict:
    """The scoring settings recipe ``name`` changes (``{ScoreConfig field: value}``)."""
    return dict(RECIPES[name]["score"])


def recipe_flags(name: str) -> tuple[list[str], list[str]]:
    """The recipe as command-line flags ``(train flags, score flags)``, for scripts and docs."""
    def flags(values: dict) -> list[str]:
        out = []
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                out.append(flag)
            elif isinstance(value, (list, tuple)):
                out += [flag, ",".join(map(str, value))]
            else:
                out += [flag, str(value)]
        return out

    recipe = RECIPES[name]
    return flags(recipe["train"]), flags(recipe["score"])


for _name, _recipe in RECIPES.items():
    check_recipe(_name, _recipe)
