"""Acquisition of a phantom: scanner grids and patient pose per modality, and the rendering of a
tissue map as CT (HU: contrast phase, texture, blur, noise) or T2-like MRI (fat bright or
suppressed, texture, blur, bias field, gain, Rician noise)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.nifti import spacing_of
from .anatomy import _N_TISSUES, _T, _Body, _Tissue
from .geometry import _Grid, _direction_matrix, _rotation

#: Voxel orientation codes (nibabel ``aff2axcodes``) of the two modalities.
CT_AXCODES = "LPS"
MRI_AXCODES = "RAS"


# CT, HU: (unenhanced, portal-venous phase, texture sd).
_CT_HU: dict[_Tissue, tuple[float, float, float]] = {
    _T.AIR: (-1000, -1000, 0),
    _T.TABLE: (150, 150, 10),
    _T.FAT: (-105, -105, 10),
    _T.VISCERAL_FAT: (-95, -95, 14),
    _T.MUSCLE: (50, 58, 7),
    _T.BOWEL: (32, 75, 18),
    _T.GAS: (-950, -950, 30),
    _T.FLUID: (8, 12, 5),
    _T.LIVER: (60, 105, 6),
    _T.LIVER_VESSEL: (45, 170, 10),
    _T.KIDNEY_CORTEX: (35, 175, 8),
    _T.KIDNEY_MEDULLA: (30, 105, 8),
    _T.SPLEEN: (50, 115, 6),
    _T.PANCREAS: (42, 90, 10),
    _T.BILE: (12, 12, 4),
    _T.AORTA: (45, 195, 6),
    _T.VEIN: (42, 150, 8),
    _T.CORTICAL_BONE: (750, 750, 60),
    _T.MARROW: (230, 230, 35),
    _T.DISC: (85, 90, 8),
    _T.CSF: (12, 12, 4),
    _T.RIB: (450, 450, 60),
}

# T2-like MRI, relative signal: (fat bright, fat suppressed, relative texture sd).
_MR_T2: dict[_Tissue, tuple[float, float, float]] = {
    _T.AIR: (0.0, 0.0, 0.0),
    _T.TABLE: (0.0, 0.0, 0.0),
    _T.FAT: (0.85, 0.10, 0.06),
    _T.VISCERAL_FAT: (0.80, 0.10, 0.08),
    _T.MUSCLE: (0.12, 0.14, 0.08),
    _T.BOWEL: (0.45, 0.45, 0.30),
    _T.GAS: (0.01, 0.01, 0.0),
    _T.FLUID: (0.92, 0.92, 0.04),
    _T.LIVER: (0.22, 0.25, 0.05),
    _T.LIVER_VESSEL: (0.06, 0.06, 0.10),
    _T.KIDNEY_CORTEX: (0.50, 0.55, 0.05),
    _T.KIDNEY_MEDULLA: (0.64, 0.70, 0.05),
    _T.SPLEEN: (0.46, 0.52, 0.05),
    _T.PANCREAS: (0.32, 0.35, 0.08),
    _T.BILE: (1.00, 1.00, 0.03),
    _T.AORTA: (0.03, 0.03, 0.10),
    _T.VEIN: (0.07, 0.07, 0.10),
    _T.CORTICAL_BONE: (0.03, 0.03, 0.10),
    _T.MARROW: (0.42, 0.15, 0.08),
    _T.DISC: (0.70, 0.70, 0.05),
    _T.CSF: (0.95, 0.95, 0.03),
    _T.RIB: (0.10, 0.08, 0.10),
}


def _pose(rng: np.random.Generator) -> np.ndarray:
    """Patient -> world: the patient lies a few degrees rotated, somewhere on the table."""
    pose = np.eye(4)
    pose[:3, :3] = _rotation(*np.clip(rng.normal(0.0, [1.5, 1.5, 3.0]), -5.0, 5.0))
    pose[:3, 3] = [rng.normal(0.0, 10.0), rng.normal(0.0, 12.0), rng.uniform(-450.0, 150.0)]
    return pose


def _grid(rng, body: _Body, pose: np.ndarray, axcodes: str, spacing, shape,
          oblique: np.ndarray | None) -> _Grid:
    """A grid of ``shape`` voxels of ``spacing`` mm, centred near the upper abdomen."""
    direction = _direction_matrix(axcodes)
    if oblique is not None:
        direction = oblique @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing, float)
    fov_centre = np.array([rng.normal(0.0, 6.0), rng.normal(0.0, 6.0) + 0.5 * (body.b_ant - body.b_post),
                           rng.uniform(-5.0, 15.0), 1.0])
    world_centre = (pose @ fov_centre)[:3]
    affine[:3, 3] = world_centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return _Grid(tuple(int(n) for n in shape), affine, pose)


def _ct_grid(rng, body: _Body) -> _Grid:
    """Square axial FOV covering the body, ~2 mm in-plane, 5 mm slices, LPS voxel order."""
    spacing_xy = rng.uniform(1.8, 2.2)
    fov = 2.0 * body.a + 2.0 * rng.uniform(18.0, 35.0)
    n_xy = int(2 * np.ceil(fov / spacing_xy / 2))
    n_z = int(rng.integers(30, 37))
    return _grid(rng, body, _pose(rng), CT_AXCODES, (spacing_xy, spacing_xy, 5.0), (n_xy, n_xy, n_z), None)


def _mri_grid(rng, body: _Body) -> _Grid:
    """128 x 112 rectangular FOV, 1.6-2.6 mm in-plane, 7.5 mm slices, RAS order, 3-5 deg oblique."""
    shape = (128, 112, int(rng.integers(22, 27)))
    fits = max((2 * body.a + 24.0) / shape[0], (body.b_ant + body.b_post + 24.0) / shape[1])
    spacing_xy = max(rng.uniform(1.6, 2.6), fits)  # the FOV always covers the body
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(3.0, 5.0))
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    oblique = np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew  # Rodrigues
    return _grid(rng, body, _pose(rng), MRI_AXCODES, (spacing_xy, spacing_xy, 7.5), shape, oblique)


def _texture(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """Fine-grained tissue texture, unit sd, correlated over ~2 mm."""
    sigma = [max(0.3, 1.5 / s) for s in spacing]
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / np.float32(noise.std() + 1e-6)


def _blur(image: np.ndarray, spacing) -> np.ndarray:
    """Partial volume / point spread: a Gaussian of ~1.3 mm in-plane and ~35% of a slice through-plane."""
    sigma = (1.3 / spacing[0], 1.3 / spacing[1], 0.35)
    return ndimage.gaussian_filter(image, sigma)


def _render_ct(tissue: np.ndarray, grid: _Grid, rng: np.random.Generator) -> np.ndarray:
    """HU: per-tissue values (portal-venous contrast in most cases), texture, blur, 10-20 HU noise."""
    spacing = spacing_of(grid.affine)
    enhanced = rng.random() < 0.8
    uptake = rng.uniform(0.75, 1.2) if enhanced else 0.0
    table = np.array([_CT_HU[t] for t in _Tissue], dtype=np.float64)
    mean = table[:, 0] + uptake * (table[:, 1] - table[:, 0]) + rng.normal(0.0, 5.0, _N_TISSUES)
    mean[_T.AIR] = -1000.0
    image = mean.astype(np.float32)[tissue]
    image += table[:, 2].astype(np.float32)[tissue] * _texture(rng, grid.shape, spacing)
    image = _blur(image, spacing)
    image += rng.normal(0.0, rng.uniform(10.0, 20.0), grid.shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.float32)


def _bias_field(rng: np.random.Generator, grid: _Grid, body: _Body) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field, 1 +/- 15-30 % over the body."""
    x, y, z = grid.coords(grid.full)
    u, v, w = x / np.float32(body.a), y / np.float32(body.b_post), z / np.float32(120.0)
    terms = (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)
    log_field = sum(np.float32(c) * t for c, t in zip(rng.normal(0.0, 1.0, len(terms)), terms))
    inside = body.level(x, y, z) < 1
    log_field -= np.float32(np.median(log_field[inside]))
    extent = float(np.abs(log_field[inside]).max()) + 1e-6
    return np.exp(log_field * np.float32(np.log1p(rng.uniform(0.15, 0.3)) / extent))


def _render_mri(tissue: np.ndarray, grid: _Grid, body: _Body, rng: np.random.Generator) -> np.ndarray:
    """T2-like signal: per-tissue values (fat suppressed in a quarter of cases), texture, blur,
    bias field, random gain, Rician noise."""
    spacing = spacing_of(grid.affine)
    fat_sat = rng.random() < 0.25
    table = np.array([_MR_T2[t] for t in _Tissue], dtype=np.float64)
    mean = (table[:, 1] if fat_sat else table[:, 0]) * np.exp(rng.normal(0.0, 0.08, _N_TISSUES))
    signal = mean.astype(np.float32)[tissue]
    signal *= 1 + table[:, 2].astype(np.float32)[tissue] * _texture(rng, grid.shape, spacing)
    signal = _blur(signal, spacing) * _bias_field(rng, grid, body)
    gain = rng.uniform(300.0, 1000.0)
    sd = gain * rng.uniform(0.012, 0.03)
    real = signal * np.float32(gain) + rng.normal(0.0, sd, grid.shape).astype(np.float32)
    imag = rng.normal(0.0, sd, grid.shape).astype(np.float32)
    return np.clip(np.rint(np.sqrt(real * real + imag * imag)), 0, 32767).astype(np.float32)
