"""Stage 2 scoring: features, memory banks (exact k-NN, coreset), fusion, metrics, pictures, reports.

- ``Detector`` / ``ScoreConfig``: the trained detector as one object (fit, predict, save, load);
- ``AnomalyModel`` (:mod:`scoring.engine.model`): the one ``nn.Module`` where every score is computed;
- ``score_categories`` / ``ScoringRun``: what the inference scripts do, as a Python call.
"""

from .config import ScoreConfig
from .detector import Detector, Prediction
from .engine.model import AnomalyModel, AnomalyScorer
from .pipeline.runner import score_categories
from .pipeline.runs import ScoringRun

__all__ = ["AnomalyModel", "AnomalyScorer", "Detector", "Prediction", "ScoreConfig", "ScoringRun", "score_categories"]
