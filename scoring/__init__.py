"""Stage 2 scoring: features, memory bank (k-NN, coreset), fusion, metrics, pictures, reports.

The trained detector as one object: ``from scoring import Detector, ScoreConfig``.
"""

from .bank import MemoryBank
from .config import ScoreConfig
from .detector import Detector, Prediction

__all__ = ["Detector", "MemoryBank", "Prediction", "ScoreConfig"]
