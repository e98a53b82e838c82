"""Synthetic abdominal phantoms (one anatomy, rendered as CT or T2-like MRI) and phantom datasets on disk."""

from .anatomy import PHANTOM_LABELS
from .phantom import PhantomCase, make_phantom
from .rendering import CT_AXCODES, MRI_AXCODES
from .writing import CT_DATASET, MRI_DATASET, MRI_PARTIAL_ORGANS, write_phantom_datasets

__all__ = [
    "CT_AXCODES",
    "CT_DATASET",
    "MRI_AXCODES",
    "MRI_DATASET",
    "MRI_PARTIAL_ORGANS",
    "PHANTOM_LABELS",
    "PhantomCase",
    "make_phantom",
    "write_phantom_datasets",
]
