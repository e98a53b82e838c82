"""Data layer: reading datasets, label mapping, preprocessing, cache, splits and the data check."""

# The names below load their module on first use (PEP 562): `fedgin data check` and `fedgin
# phantoms` read NIfTI without importing torch, which preprocessing, the cache and sites need.
# (``preprocess``, the function, stays in fedgin.data.preprocess: here it would hide the module.)

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import cache_info, clear_cache, default_cache_dir, load_case
    from .check import CaseRow, check_datasets
    from .datasets import CaseRef, Dataset, normalise_modality, open_dataset
    from .labels import LabelScheme, get_scheme
    from .nifti import axcodes_of, read_volume, spacing_of, write_volume
    from .preprocess import Geometry, Preprocessed, PreprocessConfig
    from .sites import CaseData, SiteData, load_site, test_refs
    from .splits import Split, split_for

_EXPORTS = {
    "cache": ("cache_info", "clear_cache", "default_cache_dir", "load_case"),
    "check": ("CaseRow", "check_datasets"),
    "datasets": ("CaseRef", "Dataset", "normalise_modality", "open_dataset"),
    "labels": ("LabelScheme", "get_scheme"),
    "nifti": ("axcodes_of", "read_volume", "spacing_of", "write_volume"),
    "preprocess": ("Geometry", "Preprocessed", "PreprocessConfig"),
    "sites": ("CaseData", "SiteData", "load_site", "test_refs"),
    "splits": ("Split", "split_for"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
