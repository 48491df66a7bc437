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
    # The recommended recipe, kept to what holds on both development data sets (Magnetic Tile and
    # toothbrush; docs/results.md "Two development data sets"): warm-up + cosine schedule, the
    # CutPaste-scar and CutPaste-shapes classes, batch 16 and dense self-supervision (the
    # segmentation head trains the backbone; scoring keeps the paper's k-NN map, which beat the
    # fused map on Magnetic Tile). Without dense (the recipe until 2026-11-29) it lost image AUROC
    # on toothbrush; the shapes class gained on both data sets.
    # Since 2026-12-04 it also keeps the images' aspect ratio and scale (`frame` auto: up to 4x the
    # training size's area, trained on tiles of the training size) and scores them with a certified
    # coreset of 10% (image scores exact, at 2.6x the paper protocol's cost per test image):
    # docs/results.md "Localisation at the defects' scale" (three development data sets).
    # Since 2026-12-06 a quarter of the training samples are whole images instead of tiles
    # (`whole_share`; none where the frame is square): image AUROC +3.5 points on the three sets' mean,
    # pixel AUROC +1.4, AUPRO +0.7 (docs/results.md "Whole images beside the tiles").
    "best": {
        "train": {"sched": "cosine", "warmup": 2, "augs": ("cutpaste", "perlin", "scar", "shapes"), "batch_size": 16,
                  "dense": True, "frame": "auto", "whole_share": 0.25},
        # Since 2026-12-06 its maps read 64 rows of each patch's coreset cell (`cells`): pixel AUROC
        # within 0.1 point of the whole bank's instead of 0.35-0.7 below (docs/speed.md "Cell lists").
        # Since 2026-12-06 (late) its image scores come from the view whose cross-fitted training scores
        # spread less, the frame's map or the image remade at the training size (`image_view` auto;
        # maps stay the frame's): docs/results.md "The image score's view".
        # Since 2026-12-07 each map loses half its own minimum (`floor`; image scores unchanged): pixel
        # AUROC and AUPRO up on all twelve networks measured on the three sets (docs/results.md "Half
        # of each map's floor").
        # Since 2026-12-07 (night) layer 3 reaches layer 2's grid bilinearly for the frame's maps (`upsample`;
        # the square view stays the paper's nearest): AUPRO up on all three sets (+0.1, +1.1, +0.8), pixel
        # AUROC +0.14 on their mean (docs/results.md "Layer 3 resized bilinearly").
        # Since 2026-12-07 (latest) the frame's layers are scaled to vary alike over the training patches
        # (`balance`; the square view stays unscaled): image AUROC +0.9 / +4.4 / 0, pixel AUROC +0.4 / +2.3 / -0.2
        # and AUPRO +3.5 / +2.6 / 0 points on toothbrush / KolektorSDD / Magnetic Tile (docs/results.md "Each
        # layer weighed alike").
        "score": {"coreset": 0.1, "cells": 64, "image_view": "auto", "floor": 0.5, "upsample": "bilinear",
                  "balance": True},
    },
    # Dense self-supervision alone on the paper protocol: a segmentation head learns each synthetic
    # anomaly's mask beside the classifier. Score with --map knn (default), head or fused.
    "dense": {"train": {"dense": True}, "score": {}},
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
