"""Data layer: reading datasets, label mapping, preprocessing, cache, splits and the data check."""
