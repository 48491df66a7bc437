"""Stage 2 scoring: features, memory bank (k-NN, coreset), fusion, metrics, pictures, reports."""
