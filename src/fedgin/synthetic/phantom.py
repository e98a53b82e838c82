"""Synthetic abdominal phantoms: one anatomical model rendered as CT (HU) or as T2-like MRI.

The demo and the tests need CT and MRI sites without external data. Each phantom is a random
patient (body outline, fat, muscle, spine, ribs, aorta, IVC, bowel, stomach, duodenum and the six
labelled organs) built in a *patient frame*, then sampled onto a scanner grid through the case's
affine and rendered with modality-specific contrast, so that:

- shapes come from one anatomical distribution for both modalities;
- intensities do not: the organ ordering of the T2-like MRI differs from CT's (bile and fat are
  bright, liver dark, spleen brighter than liver, vessels flow-void dark) and MRI adds a smooth
  multiplicative bias field, Rician noise and an arbitrary gain. A model trained on phantom CT
  alone therefore transfers poorly to phantom MRI, as on real data.

Coordinates. World coordinates are NIfTI/nibabel RAS+ mm: +x toward the patient's **Right**,
+y **Anterior**, +z **Superior** (nibabel's docs: "RAS (left to Right, posterior to Anterior,
inferior to Superior)"; DICOM's LPS is the same space with x and y negated). The patient frame uses
the same axes, its origin at the body centre at about the level of the renal hila; a small pose
(a few degrees of rotation, a table offset) maps it to world. The liver therefore has *larger* world
x than the spleen. Voxel order: CT is stored ``LPS`` (axis 0 toward the patient's left, axis 1
toward posterior, axis 2 toward superior, as DICOM slices are), MRI ``RAS`` with a 3-5 degree
oblique tilt of the slice stack; ``nibabel.aff2axcodes`` reports exactly these codes.

Randomness. ``make_phantom(seed, modality)`` draws the anatomy from ``seed`` alone and the
acquisition (grid, pose, contrast, noise) from ``(seed, modality)``: the same seed gives the same
patient seen by either scanner. :func:`write_phantom_datasets` gives every case its own seed derived
from ``(seed, modality, index)``, so the CT and MRI sites never share a patient.
"""


from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data.datasets import normalise_modality
from ..errors import FedginError
from .anatomy import ORGANS, _draw_anatomy, _paint
from .rendering import _ct_grid, _mri_grid, _render_ct, _render_mri

_MODALITY_CODE = {"CT": 1, "MRI": 2}


@dataclass
class PhantomCase:
    """One synthetic case.

    Attributes:
        case_id: e.g. ``phantom_ct_000``.
        modality: ``"CT"`` or ``"MRI"``.
        image: ``X x Y x Z`` float32 in the voxel order of ``affine``; CT in HU (integers,
            -1024..3071), MRI in arbitrary units >= 0 (integers, roughly 0..1500).
        label: ``X x Y x Z`` uint8, ids of :data:`PHANTOM_LABELS`; 0 is background, or *unknown*
            for organs missing from ``annotated``.
        affine: 4 x 4 voxel -> world RAS+ mm.
        annotated: fine organ names annotated in ``label``.
    """

    case_id: str
    modality: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    annotated: tuple[str, ...] = ORGANS


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FedginError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def make_phantom(seed: int, modality: str, *, case_id: str | None = None) -> PhantomCase:
    """One synthetic abdominal case with all six organs annotated.

    Args:
        seed: non-negative integer. The anatomy depends on ``seed`` only, the acquisition (grid,
            pose, contrast, noise) on ``(seed, modality)``: the same seed is the same patient in
            both modalities, and repeating a call gives identical arrays.
        modality: ``"CT"`` or ``"MRI"`` (``"MR"``, ``"T2"`` ... accepted).
        case_id: defaults to ``phantom_ct_s{seed}`` / ``phantom_mr_s{seed}``.

    Returns:
        CT: about 130-200 (typically ~160) squared x 30-36 voxels of 1.8-2.2 x 1.8-2.2 x 5 mm, ``LPS``, HU.
        MRI: 128 x 112 x 22-26 voxels of 1.6-2.6 x 1.6-2.6 x 7.5 mm, ``RAS`` tilted 3-5 degrees,
        T2-like arbitrary units.
    """
    seed = _check_seed(seed)
    modality = normalise_modality(modality)
    anatomy = _draw_anatomy(np.random.default_rng(np.random.SeedSequence([seed, 0])))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, _MODALITY_CODE[modality]]))
    if modality == "CT":
        grid = _ct_grid(rng, anatomy.body)
        tissue, label = _paint(anatomy, grid, table=True)
        image = _render_ct(tissue, grid, rng)
    else:
        grid = _mri_grid(rng, anatomy.body)
        tissue, label = _paint(anatomy, grid, table=False)
        image = _render_mri(tissue, grid, anatomy.body, rng)
    if case_id is None:
        case_id = f"phantom_{'ct' if modality == 'CT' else 'mr'}_s{seed}"
    return PhantomCase(case_id, modality, image, label, grid.affine.copy(), ORGANS)
