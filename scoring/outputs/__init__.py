"""What a scoring run writes: CSV / NPZ / PNG files (``writing``), heatmap panels and ROC curves
(``pictures``), atomic JSON / Markdown / CSV tables (``report``) and the versioned output folders
that never replace another run's results (``folders``)."""
