"""Named recipes: sets of defaults for training and scoring. ``paper`` is the paper's protocol.

A recipe only changes defaults: any flag given on the command line still wins, and the
checkpoint records the recipe it was trained with (``recipe`` key). See README "Results" for
what ``best`` was chosen on and what it gains.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, dict]] = {
    "paper": {"train": {}, "score": {}},
    # Magnetic Tile, wave18, 128 px, 20 epochs, 3 seeds (README "Results"): 0.943 +- 0.004 image /
    # 0.743 +- 0.005 pixel AUROC (concatenation) against 0.805 +- 0.058 / 0.690 +- 0.002 for the
    # paper protocol. Warm-up + cosine and the scar class were picked on seed 0 and confirmed on
    # seeds 1-2; batch 16 (twice the SGD steps over the same images, no more training time here)
    # was picked by the label-free synthetic check, which prefers it on every seed and fusion.
    # The check prefers no smoothing and k = 1, so the scoring stays the paper's.
    "best": {
        "train": {"sched": "cosine", "warmup": 2, "augs": "cutpaste,perlin,scar", "batch_size": 16},
        "score": {},
    },
}


def recipe_flags(name: str) -> tuple[list[str], list[str]]:
    """The recipe as command-line flags ``(train flags, score flags)``, for scripts and docs."""
    def flags(values: dict) -> list[str]:
        out = []
        for key, value in values.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                out.append(flag)
            elif isinstance(value, list):
                out += [flag, ",".join(map(str, value))]
            else:
                out += [flag, str(value)]
        return out

    recipe = RECIPES[name]
    return flags(recipe["train"]), flags(recipe["score"])
