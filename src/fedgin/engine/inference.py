"""Slice-wise inference of the 2D model on whole volumes (no GIN: prediction sees real intensities)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.preprocess import Preprocessed, probabilities_to_original


@torch.no_grad()
def predict_probs(model: torch.nn.Module, image: np.ndarray, device: torch.device,
                  batch_size: int = 32) -> torch.Tensor:
    """Softmax probabilities ``C x D x H x W`` for a preprocessed ``D x H x W`` volume."""
    was_training = model.training
    model.eval()
    chunks = []
    amp = device.type == "cuda"
    for start in range(0, image.shape[0], batch_size):
        x = torch.from_numpy(image[start:start + batch_size])[:, None].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        chunks.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(chunks).permute(1, 0, 2, 3)


def predict_labels(model: torch.nn.Module, pre: Preprocessed, device: torch.device) -> np.ndarray:
    """uint8 label map on the case's own input grid (same shape as the input file)."""
    probs = predict_probs(model, pre.image, device)
    return probabilities_to_original(probs, pre.geometry).argmax(0).numpy().astype(np.uint8)


def predict_preprocessed_labels(model: torch.nn.Module, image: np.ndarray,
                                device: torch.device) -> np.ndarray:
    """Label map ``D x H x W`` in preprocessed space (validation during training)."""
    return predict_probs(model, image, device).argmax(0).numpy().astype(np.uint8)
