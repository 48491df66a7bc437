"""The run pipeline: what the inference scripts do around a detector (stage 2 as a run).

- ``runner``: ``score_categories`` (a category: checkpoint, detector, test set or image folder, files);
- ``cli``: the scripts' flags mapped onto ``ScoreConfig`` and ``ScoringRun``;
- ``runs``: the checkpoint a run reads, its identity and settings record, its output place;
- ``cache``: the memory-bank cache beside a checkpoint;
- ``evaluation``: a test set or an image folder scored (results and metrics, no files);
- ``sharding``: what a bank split over torchrun processes can and cannot do;
- ``synthetic_check``: the label-free check on held-out training images.
"""
