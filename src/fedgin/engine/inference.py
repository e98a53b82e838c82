"""Slice-wise inference of the 2D model on whole volumes (no GIN: prediction sees real intensities)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.preprocess import Preprocessed, labels_and_probabilities_from_slices, labels_from_slices


def iter_probs(model: torch.nn.Module, image: np.ndarray, device: torch.device, batch_size: int = 32):
    """``(first slice, C x d x H x W softmax probabilities)`` for each batch of slices of a
    preprocessed ``D x H x W`` volume (on the CPU)."""
    was_training = model.training
    model.eval()
    amp = device.type == "cuda"
    try:
        for start in range(0, image.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(image[start:start + batch_size]))[:, None].to(device)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            yield start, torch.softmax(logits.float(), dim=1).cpu().permute(1, 0, 2, 3)
    finally:
        model.train(was_training)


def predict_probs(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                  batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities ``C x D x H x W`` for a preprocessed ``D x H x W`` volume."""
    return torch.cat([p for _, p in iter_probs(model, image, device, batch_size)], dim=1)


def predict_labels(model: torch.nn.Module, pre: Preprocessed, device: torch.device) -> np.ndarray:
    """uint8 label map on the case's own input grid (same shape as the input file), computed batch
    of slices by batch (memory does not grow with the class count times the input's size)."""
    return labels_from_slices(iter_probs(model, pre.image, device), pre.geometry)


def predict_labels_and_probabilities(model: torch.nn.Module, pre: Preprocessed,
                                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_labels` plus the softmax probabilities on the input grid, ``C x X x Y x Z``
    float16 in the input file's voxel order (argmax = the labels), also batch by batch: memory
    grows by the float16 array only."""
    return labels_and_probabilities_from_slices(iter_probs(model, pre.image, device), pre.geometry)


def predict_preprocessed_labels(model: torch.nn.Module, image: np.ndarray,
                                device: torch.device) -> np.ndarray:
    """Label map ``D x H x W`` in preprocessed space (validation during training)."""
    return predict_probs(model, image, device).argmax(0).numpy().astype(np.uint8)
