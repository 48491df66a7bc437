"""Stage 2 with the multiplication fusion of layer features (the paper's inference_multiplication.py).

    python inference_multiplication.py --c zipper --p zipper-wave50
    python inference_multiplication.py --c magnetic_tile --data-root ../shared/datasets --p magnetic_tile-wave18
    python inference_multiplication.py --c zipper --p zipper-wave50 --images new_photos/   # unlabeled images

All flags and outputs are shared with the other inference script (see scoring/cli.py).
"""

from scoring.pipeline.cli import run

if __name__ == "__main__":
    run("multiplication")
