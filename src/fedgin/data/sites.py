"""A site's data, ready for the trainer: preprocessed training and validation cases, whose
arrays stay in the preprocessing cache on disk (memory does not grow with a site's size).

Only this module (and the evaluation/prediction code) touches images; what the federated client
sends is built from the trainer's results, never from these arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .body import BodySide, body_side
from .cache import load_case, organ_slices
from .datasets import CaseRef, Dataset, open_dataset
from .labels import LabelScheme
from .npy import NpyVolume
from .preprocess import Geometry, PreprocessConfig
from .splits import Split, split_for


@dataclass
class CaseData:
    """One preprocessed case: ``image`` D x H x W float32, ``label`` D x H x W uint8 (arrays, or
    :class:`NpyVolume` read from the cache a slice at a time), ``annotated`` a bool vector over
    classes (background always True), ``organ_slices`` per slice whether it shows an organ (None:
    computed from the label)."""

    case_id: str
    modality: str
    image: np.ndarray | NpyVolume
    label: np.ndarray | NpyVolume
    annotated: np.ndarray
    geometry: Geometry
    ref: CaseRef
    organ_slices: np.ndarray | None = None

    def slices_with_organs(self) -> np.ndarray:
        if self.organ_slices is None:
            self.organ_slices = organ_slices(np.asarray(self.label))
        return self.organ_slices


@dataclass
class ValidationCase:
    """A validation case as a user's prediction sees it: ``image`` the image alone preprocessed
    exactly as ``fedgin predict`` does (D x H x W, its plane the body's box, never widened to the
    label) with its ``geometry`` back to the input grid, and ``reference`` the label on that input
    grid (X x Y x Z uint8 scheme ids); ``annotated`` as :class:`CaseData`'s. Validation Dice and
    the post-processing decision are computed on the input grid, as ``fedgin evaluate`` scores."""

    case_id: str
    modality: str
    image: np.ndarray | NpyVolume
    geometry: Geometry
    reference: np.ndarray
    annotated: np.ndarray
    ref: CaseRef
    body: BodySide | None = None  # for the post-processing's side rule (fedgin.engine.postprocess)


@dataclass
class SiteData:
    name: str
    modality: str
    dataset: Dataset
    split: Split
    train: list[CaseData]
    val: list[ValidationCase]

    @property
    def num_train_slices(self) -> int:
        return int(sum(len(c.image) for c in self.train))


def annotated_mask(ref: CaseRef, scheme: LabelScheme) -> np.ndarray:
    mask = np.zeros(scheme.num_classes, dtype=bool)
    mask[0] = True
    for organ in ref.annotated:
        mask[scheme.label_ids[organ]] = True
    return mask


def load_case_data(ref: CaseRef, scheme: LabelScheme, cfg: PreprocessConfig,
                   cache_dir: Path | None) -> CaseData:
    """``ref`` preprocessed, its arrays left in the cache entry (read a slice at a time)."""
    pre = load_case(ref, scheme, cfg, cache_dir, in_memory=False)
    if pre.label is None:
        raise DataError(ref.image, "training and validation cases need a label")
    return CaseData(ref.case_id, ref.modality, pre.image, pre.label, annotated_mask(ref, scheme),
                    pre.geometry, ref, pre.organ_slices)


def load_validation_case(ref: CaseRef, scheme: LabelScheme, cfg: PreprocessConfig,
                         cache_dir: Path | None) -> ValidationCase:
    """``ref`` as :class:`ValidationCase`: its image preprocessed alone (through the cache, read a
    slice at a time) and its label on the input grid."""
    pre = load_case(ref, scheme, cfg, cache_dir, in_memory=False, image_only=True)
    image, reference, affine = ref.read(scheme)
    if reference is None:
        raise DataError(ref.image, "validation cases need a label")
    return ValidationCase(ref.case_id, ref.modality, pre.image, pre.geometry, reference,
                          annotated_mask(ref, scheme), ref, body_side(image, affine, ref.modality))


def load_site(
    name: str,
    dataset_path: str,
    scheme: LabelScheme,
    cfg: PreprocessConfig,
    *,
    seed: int = 0,
    split_file: str | None = None,
    cache_dir: Path | None = None,
    modality: str | None = None,
    train_ids: list[str] | None = None,
    label_map: Mapping[str, str] | None = None,
) -> SiteData:
    """Open a site's dataset, split it and preprocess its training and validation cases.

    ``train_ids`` restricts training to those cases (the scenarios' limited MRI site);
    ``label_map`` maps source label names first (``--label-map``, see :func:`open_dataset`).
    """
    dataset = open_dataset(dataset_path, scheme, modality=modality, label_map=label_map)
    split = split_for(dataset.name, [c.case_id for c in dataset.cases], seed, split_file)
    ids = train_ids if train_ids is not None else list(split.train)
    train = [load_case_data(dataset.case(i), scheme, cfg, cache_dir) for i in ids]
    val = [load_validation_case(dataset.case(i), scheme, cfg, cache_dir) for i in split.val]
    if not train:
        raise DataError(dataset.root, f"site {name}: no training cases")
    return SiteData(name=name, modality=dataset.modality, dataset=dataset, split=split,
                    train=train, val=val)


def test_refs(dataset: Dataset, split: Split) -> list[CaseRef]:
    """The split's test cases plus any labelled ``imagesTs`` cases."""
    refs = [dataset.case(i) for i in split.test]
    return refs + [c for c in dataset.test_cases if c.label is not None or c.masks]
