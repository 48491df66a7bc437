"""Data: MVTec-layout discovery, image loading, training set with synthetic anomalies, test set."""

from .images import IMAGE_SUFFIXES, list_images, load_image, read_gray, read_mask, read_rgb, to_float
from .mvtec import (
                    MVTEC_CATEGORIES,
                    TestSample,
                    TestSet,
                    TrainSet,
                    find_categories,
                    resolve_categories,
                    test_samples,
                    train_images,
)

__all__ = ["IMAGE_SUFFIXES", "MVTEC_CATEGORIES", "TestSample", "TestSet", "TrainSet",
           "find_categories", "list_images", "load_image", "read_gray", "read_mask", "read_rgb",
           "resolve_categories", "test_samples", "to_float", "train_images"]
