"""Data layer: reading datasets, label mapping, preprocessing, cache, splits, phantoms."""
