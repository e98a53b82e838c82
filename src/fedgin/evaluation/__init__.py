"""Applying a trained model: scoring it on datasets (evaluate) and writing its predictions as NIfTI (predict)."""
