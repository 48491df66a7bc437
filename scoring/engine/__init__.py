"""The tensor engine: what :class:`scoring.engine.model.AnomalyModel` needs to turn images into scores
and maps, and nothing about files, runs or pictures.

- ``features``: the network's pooled stage features (tiles for large frames);
- ``knn``: the exact memory-bank search (backends: :class:`~scoring.engine.knn.Shortlist` classes);
- ``coreset``: the bank sampler (:class:`~scoring.engine.coreset.GreedyCoresetSampler`);
- ``model``: the fusions, the banks, the certified coreset search, ``AnomalyModel``, ``ExportModel``;
- ``calibration``: the threshold and map normalisation from training images alone;
- ``dense``: the segmentation head's map sources.
"""
