"""Applying a trained model: scoring it on datasets (evaluate) and writing its predictions as NIfTI (predict)."""

from .prediction import predict
from .scoring import evaluate, mean_dice_lines, select_cases, summary_markdown

__all__ = ["evaluate", "mean_dice_lines", "predict", "select_cases", "summary_markdown"]
