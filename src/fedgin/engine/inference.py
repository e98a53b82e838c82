"""Slice-wise inference of the 2D model on whole volumes (no GIN: prediction sees real intensities).

A preprocessed plane covers the patient's whole body and may be larger than the crops the model
was trained on (``PreprocessConfig.slice_size``, recorded as ``Geometry.tile``). Such a plane is
predicted in overlapping tiles of that size, blended with Gaussian weights (MONAI's
``sliding_window_inference``, as nnU-Net does), so every tile sees what a training crop saw: the
U-Net's instance normalisation takes its statistics over one crop-sized window, never over a wider
field of view than in training.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..data.preprocess import Preprocessed, labels_and_probabilities_from_slices, labels_from_slices
from .compiled import compiled_or_eager
from .context import stack_slices

#: overlap of neighbouring tiles (MONAI's default; nnU-Net uses 0.5 at twice the cost on wide planes)
TILE_OVERLAP = 0.25


def tile_of(case) -> tuple[int, int] | None:
    """The prediction tile a preprocessed case (anything with a ``geometry``) was made for; None
    (its whole plane at once) without one."""
    geometry = getattr(case, "geometry", None)
    return tuple(geometry.tile) if geometry is not None and geometry.tile else None


def _softmax(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(x).float(), dim=1)


def _padded(step, batch_size: int):
    """``step(model, x)`` on ``x`` zero-padded to ``batch_size`` samples (one shape for the compiled
    graph; instance norm is per sample, so padding changes no real sample's output)."""
    def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < batch_size:
            x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
        return step(model, x)[:n]
    return run


def iter_probs(model: torch.nn.Module, image, device: torch.device, batch_size: int = 32,
               tile: tuple[int, int] | None = None, compile: bool = False):
    """``(first slice, C x d x H x W softmax probabilities)`` for each batch of slices of a
    preprocessed ``D x H x W`` volume (an array or an on-disk volume), on the CPU; a plane larger
    than ``tile`` in tiles of it (module docstring), ``tile=None``: the whole plane at once.
    ``compile``: the network through ``torch.compile`` (opt-in: it pays only over thousands of
    slices, see :mod:`fedgin.engine.compiled`), every batch padded to ``batch_size``."""
    was_training = model.training
    model.eval()
    amp = device.type == "cuda"
    probs_of = _softmax
    if compile:
        probs_of = _padded(compiled_or_eager(_softmax, True, device, what="inference"), batch_size)
    context = int(getattr(model, "in_channels", 1) or 1)  # 2.5D: each slice with its neighbours
    try:
        for start in range(0, len(image), batch_size):
            stop = min(len(image), start + batch_size)
            if context > 1:
                x = torch.from_numpy(stack_slices(image, start, stop, context)).to(device)
            else:
                x = torch.from_numpy(np.ascontiguousarray(image[start:stop]))[:, None].to(device)
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                if tile is None or tuple(x.shape[-2:]) == tuple(tile):
                    probs = probs_of(model, x)
                else:
                    probs = sliding_window_inference(x, tuple(tile), batch_size, lambda t: probs_of(model, t),
                                                     overlap=TILE_OVERLAP, mode="gaussian")
            yield start, probs.float().cpu().permute(1, 0, 2, 3)
    finally:
        model.train(was_training)


def predict_probs(model: torch.nn.Module, image, device: torch.device, batch_size: int = 32,
                  tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax probabilities ``C x D x H x W`` for a preprocessed ``D x H x W`` volume."""
    return torch.cat([p for _, p in iter_probs(model, image, device, batch_size, tile)], dim=1)


def predict_labels(model: torch.nn.Module, pre: Preprocessed, device: torch.device, *,
                   compile: bool = False) -> np.ndarray:
    """uint8 label map on the case's own input grid (same shape as the input file), computed batch
    of slices by batch (memory does not grow with the class count times the input's size)."""
    return labels_from_slices(iter_probs(model, pre.image, device, tile=tile_of(pre), compile=compile),
                              pre.geometry)


def predict_labels_and_probabilities(model: torch.nn.Module, pre: Preprocessed, device: torch.device, *,
                                     compile: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_labels` plus the softmax probabilities on the input grid, ``C x X x Y x Z``
    float16 in the input file's voxel order (argmax = the labels), also batch by batch: memory
    grows by the float16 array only."""
    return labels_and_probabilities_from_slices(iter_probs(model, pre.image, device, tile=tile_of(pre),
                                                           compile=compile), pre.geometry)


def case_prediction(model: torch.nn.Module, case, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, reference)`` label maps of a validation case, on the grid it is scored on: a
    :class:`fedgin.data.sites.ValidationCase` (it has a ``reference``) on its input grid, exactly
    as ``fedgin predict`` writes it before post-processing; a preprocessed case (``image`` and
    ``label`` in one plane, as tests build them) in that plane."""
    reference = getattr(case, "reference", None)
    if reference is not None:
        return predict_labels(model, case, device), np.asarray(reference)
    return predict_preprocessed_labels(model, case.image, device, tile=tile_of(case)), np.asarray(case.label)


def predict_preprocessed_labels(model: torch.nn.Module, image, device: torch.device,
                                tile: tuple[int, int] | None = None) -> np.ndarray:
    """Label map ``D x H x W`` in preprocessed space (validation during training)."""
    return predict_probs(model, image, device, tile=tile).argmax(0).numpy().astype(np.uint8)
