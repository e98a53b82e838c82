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

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import write_text
from ..errors import DataError, FedginError
from .datasets import normalise_modality
from .nifti import axcodes_of, spacing_of, write_volume

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

#: Label ids of the phantom label maps (the same table as the shared abdomen CT/MR bundle).
PHANTOM_LABELS: dict[str, int] = {
    "background": 0,
    "liver": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "spleen": 4,
    "pancreas": 5,
    "gallbladder": 6,
}
ORGANS: tuple[str, ...] = tuple(name for name in PHANTOM_LABELS if name != "background")

#: Organs annotated by the MRI site with ``mri_partial=True`` (as CHAOS MRI: no pancreas/gallbladder).
MRI_PARTIAL_ORGANS: tuple[str, ...] = ("liver", "kidney_right", "kidney_left", "spleen")

#: Voxel orientation codes (nibabel ``aff2axcodes``) of the two modalities.
CT_AXCODES = "LPS"
MRI_AXCODES = "RAS"

CT_DATASET = "Dataset901_PhantomCT"
MRI_DATASET = "Dataset902_PhantomMR"

GENERATOR = "fedgin.data.phantoms"

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


# --- tissues and their intensities ---------------------------------------------------------


class _Tissue(IntEnum):
    AIR = 0
    TABLE = 1
    FAT = 2  # subcutaneous
    VISCERAL_FAT = 3
    MUSCLE = 4
    BOWEL = 5
    GAS = 6
    FLUID = 7  # stomach / bowel / renal pelvis content
    LIVER = 8
    LIVER_VESSEL = 9
    KIDNEY_CORTEX = 10
    KIDNEY_MEDULLA = 11
    SPLEEN = 12
    PANCREAS = 13
    BILE = 14
    AORTA = 15
    VEIN = 16  # IVC, portal vein
    CORTICAL_BONE = 17
    MARROW = 18
    DISC = 19
    CSF = 20
    RIB = 21


_T = _Tissue
_N_TISSUES = len(_Tissue)

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


# --- geometry --------------------------------------------------------------------------------


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """3 x 3 rotation ``Rz @ Ry @ Rx`` for angles in degrees."""
    a, b, c = np.deg2rad([rx, ry, rz])
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rot_z = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


# axis code -> (RAS axis, sign): "L" is world -x, since RAS+ x grows toward the patient's right
_AXIS_DIRECTIONS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _direction_matrix(axcodes: str) -> np.ndarray:
    """3 x 3 matrix whose column ``i`` is the RAS unit vector voxel axis ``i`` points to."""
    out = np.zeros((3, 3))
    for i, code in enumerate(axcodes):
        axis, sign = _AXIS_DIRECTIONS[code]
        out[axis, i] = sign
    return out


@dataclass(frozen=True)
class _Grid:
    """A scanner grid: ``shape`` voxels, ``affine`` voxel -> world, ``pose`` patient -> world (4 x 4)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    pose: np.ndarray
    to_patient: np.ndarray = field(init=False)  # voxel -> patient, 4 x 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "to_patient", np.linalg.inv(self.pose) @ self.affine)

    @property
    def full(self) -> tuple[slice, slice, slice]:
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel slices covering the patient-frame box ``lo..hi`` (mm); None if it misses the grid."""
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        ijk = (np.linalg.inv(self.to_patient) @ corners.T)[:3]
        start = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        stop = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient-frame x, y, z (mm, float32) of the voxels of ``box``, each of the box's shape."""
        i, j, k = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
        i, j, k = i[:, None, None], j[None, :, None], k[None, None, :]
        m = self.to_patient.astype(np.float32)
        return tuple(m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3] for a in range(3))


@dataclass(frozen=True)
class _Blob:
    """An ellipsoid (mm) whose surface is pushed in and out by a few smooth bumps.

    A point with ellipsoid-normalised coordinates ``q`` (``|q| = 1`` on the plain ellipsoid) is
    inside when ``|q| < 1 + sum_k a_k exp(kappa_k (u . d_k - 1))`` with ``u = q / |q|``:
    low-frequency, spherical-harmonic-like deformations that keep the shape star-convex.
    """

    centre: np.ndarray  # 3
    radii: np.ndarray  # 3, semi-axes
    axes: np.ndarray  # 3 x 3, columns are the blob's axes in the patient frame
    bump_dirs: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    bump_amps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bump_kappas: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def local(self, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, ax, r = self.centre.astype(np.float32), self.axes.astype(np.float32), self.radii.astype(np.float32)
        d = (x - c[0], y - c[1], z - c[2])
        return tuple((ax[0, j] * d[0] + ax[1, j] * d[1] + ax[2, j] * d[2]) / r[j] for j in range(3))

    def level(self, x, y, z) -> np.ndarray:
        """< 1 inside, 1 on the surface; shells such as a renal cortex are level bands."""
        q = self.local(x, y, z)
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) + np.float32(1e-6)
        grow = np.ones_like(rho)
        for d, a, kappa in zip(self.bump_dirs.astype(np.float32), self.bump_amps, self.bump_kappas):
            cos = (d[0] * q[0] + d[1] * q[1] + d[2] * q[2]) / rho
            grow += np.float32(a) * np.exp(np.float32(kappa) * (cos - 1))
        return rho / grow

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        grow = 1.0 + float(np.clip(self.bump_amps, 0, None).sum())
        half = np.abs(self.axes) @ self.radii * grow
        return self.centre - half, self.centre + half


@dataclass(frozen=True)
class _Tube:
    """A tube of varying radius (mm) around a polyline: ``level = distance / local radius``."""

    points: np.ndarray  # N x 3
    radii: np.ndarray  # N

    def level(self, x, y, z) -> np.ndarray:
        best = None
        pts = self.points.astype(np.float32)
        for (p, r0), (q, r1) in zip(zip(pts[:-1], self.radii[:-1]), zip(pts[1:], self.radii[1:])):
            seg = q - p
            t = ((x - p[0]) * seg[0] + (y - p[1]) * seg[1] + (z - p[2]) * seg[2]) / np.float32(seg @ seg)
            t = np.clip(t, 0, 1)
            dx, dy, dz = x - p[0] - t * seg[0], y - p[1] - t * seg[1], z - p[2] - t * seg[2]
            dist = np.sqrt(dx * dx + dy * dy + dz * dz)
            lev = dist / (np.float32(r0) + t * np.float32(r1 - r0))
            best = lev if best is None else np.minimum(best, lev)
        return best

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = float(self.radii.max())
        return self.points.min(axis=0) - r, self.points.max(axis=0) + r


@dataclass(frozen=True)
class _Field:
    """A smooth random scalar field in the patient frame (unit sd), on a lattice of ``step`` mm."""

    lo: np.ndarray
    step: float
    values: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, lo, hi, step: float) -> _Field:
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        shape = tuple(int(n) for n in np.ceil((hi - lo) / step).astype(int) + 2)
        values = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.0, mode="wrap")
        return cls(lo, float(step), values / np.float32(values.std() + 1e-6))

    def sample(self, x, y, z) -> np.ndarray:
        idx = [(c - np.float32(self.lo[a])) / np.float32(self.step) for a, c in enumerate((x, y, z))]
        idx = [np.broadcast_to(c, np.broadcast_shapes(x.shape, y.shape, z.shape)) for c in idx]
        return ndimage.map_coordinates(self.values, idx, order=1, mode="nearest").astype(np.float32)


def _smooth_path(points: np.ndarray, radii: np.ndarray, rounds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Chaikin corner cutting: a polyline (and its radii) rounded into a smooth curve."""
    pts = np.column_stack([points, radii])
    for _ in range(rounds):
        a, b = pts[:-1], pts[1:]
        mid = np.empty((2 * len(a), pts.shape[1]))
        mid[0::2], mid[1::2] = 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b
        pts = np.vstack([pts[:1], mid, pts[-1:]])
    return pts[:, :3], pts[:, 3]


# --- the anatomy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
    a: float  # half width (mm)
    b_ant: float  # centre to anterior skin
    b_post: float  # centre to posterior skin
    power: float  # superellipse exponent
    fat_lat: float
    fat_ant: float
    fat_post: float
    muscle: float

    def level(self, x, y, z, inset_lat: float = 0.0, inset_ant: float = 0.0, inset_post: float = 0.0):
        """Superellipse outline, a little wider toward the lower ribs; < 1 inside."""
        taper = np.float32(1.0) + np.float32(0.0004) * z
        a = (np.float32(self.a) * taper) - np.float32(inset_lat)
        b = np.where(y > 0, np.float32(self.b_ant - inset_ant), np.float32(self.b_post - inset_post)) * taper
        p = np.float32(self.power)
        return (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1 / p)

    def cavity_level(self, x, y, z):
        """Inside of the muscle wall: the space organs may occupy."""
        return self.level(
            x, y, z, self.fat_lat + self.muscle, self.fat_ant + self.muscle, self.fat_post + 0.6 * self.muscle
        )


@dataclass(frozen=True)
class _Anatomy:
    body: _Body
    spine_y: float  # vertebral body centre, patient y (mm)
    spine_r: float
    vertebra_period: float
    vertebra_phase: float
    rib_pitch: float
    rib_phase: float
    aorta: tuple[float, float, float]  # x, y, radius
    ivc: tuple[float, float, float, float]  # x, y, radius x, radius y
    organs: dict[str, _Blob | _Tube]  # liver_right, liver_left, gallbladder, kidney_*, spleen, pancreas
    notches: dict[str, _Blob]  # concavities cut out of kidneys and spleen
    stomach: _Blob
    stomach_gas: bool
    duodenum: _Tube
    portal_vein: _Tube
    bowel: _Field
    gas: _Field
    vessels: tuple[_Field, _Field]


def _bumps(rng: np.random.Generator, n: int, amp: float) -> dict[str, np.ndarray]:
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return {
        "bump_dirs": dirs,
        "bump_amps": np.clip(rng.normal(0.0, amp, n), -2.5 * amp, 2.5 * amp),
        "bump_kappas": rng.uniform(1.5, 4.0, n),
    }


def _blob(rng, centre, radii, angles=(0, 0, 0), *, jitter=5.0, size_sd=0.07, bumps=5, amp=0.10,
          angle_sd=5.0, mirror=False) -> _Blob:
    """A randomly perturbed blob around a nominal ``centre``, ``radii`` (mm) and ``angles`` (deg).

    ``mirror`` reflects the blob through the mid-sagittal plane (left organ from a right template).
    """
    centre = np.asarray(centre, float) + rng.normal(0.0, jitter, 3)
    radii = np.asarray(radii, float) * np.exp(rng.normal(0.0, size_sd, 3))
    axes = _rotation(*(np.asarray(angles, float) + rng.normal(0.0, angle_sd, 3)))
    if mirror:
        flip = np.diag([-1.0, 1.0, 1.0])
        centre, axes = flip @ centre, flip @ axes
    return _Blob(centre, radii, axes, **_bumps(rng, bumps, amp))


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """A random patient in the patient frame (mm, RAS axes, origin at the body centre)."""
    a = rng.uniform(125.0, 150.0)
    b = rng.uniform(88.0, 108.0)
    body = _Body(
        a=a, b_ant=b * rng.uniform(0.98, 1.08), b_post=b, power=rng.uniform(2.2, 2.7),
        fat_lat=rng.uniform(8.0, 30.0), fat_ant=rng.uniform(8.0, 32.0), fat_post=rng.uniform(6.0, 16.0),
        muscle=rng.uniform(9.0, 14.0),
    )
    sx, sy = a / 138.0, b / 98.0  # organ positions follow the body size
    grow = np.sqrt(sx * sy) ** 0.5 * np.exp(rng.normal(0.0, 0.06))  # organ size follows it loosely
    spine_r = rng.uniform(17.0, 21.0)
    spine_y = -body.b_post + rng.uniform(52.0, 60.0) * sy
    aorta_r = rng.uniform(9.5, 12.5)
    aorta = (rng.uniform(-20.0, -12.0), spine_y + spine_r + aorta_r + rng.uniform(1.0, 5.0), aorta_r)
    ivc = (rng.uniform(20.0, 28.0), spine_y + spine_r + rng.uniform(4.0, 10.0),
           rng.uniform(10.0, 13.0), rng.uniform(7.0, 10.0))

    g = grow
    organs: dict[str, _Blob | _Tube] = {
        "liver_right": _blob(rng, (60 * sx, 6 * sy, 30), np.array([62, 72, 75]) * g, (0, 0, -5), amp=0.12),
        "liver_left": _blob(rng, (-8 * sx, 42 * sy, 45), np.array([52, 28, 34]) * g, (0, 10, -18), amp=0.12),
        # fundus anterior-inferior, neck tucked into the liver's inferior surface
        "gallbladder": _blob(rng, (40 * sx, 36 * sy, -28), np.array([13, 14, 30]) * g, (40, 0, 0),
                             jitter=4.0, bumps=3, amp=0.06),
        # right kidney: lower than the left; upper pole medial, hilum facing anteromedially
        "kidney_right": _blob(rng, (68 * sx, -34 * sy, -24), np.array([23, 19, 50]) * g, (0, -12, -30),
                              jitter=4.0, amp=0.05, angle_sd=3.0),
        "kidney_left": _blob(rng, (68 * sx, -34 * sy, -8), np.array([23, 19, 50]) * g, (0, -12, -30),
                             jitter=4.0, amp=0.05, angle_sd=3.0, mirror=True),
    }
    # spleen: a crescent along the left posterolateral wall, thin axis along the wall's normal
    centre = np.array([-80 * sx, -30 * sy, 35]) + rng.normal(0.0, 5.0, 3)
    normal = np.array([centre[0] / body.a**2, centre[1] / body.b_post**2, 0.0])
    normal /= np.linalg.norm(normal)
    tilt = _rotation(*rng.normal(0.0, 6.0, 3))
    axes = tilt @ np.column_stack([normal, [-normal[1], normal[0], 0.0], [0.0, 0.0, 1.0]])
    spleen_r = np.array([20, 52, 48]) * g * np.exp(rng.normal(0.0, 0.08, 3))
    organs["spleen"] = _Blob(centre, spleen_r, axes, **_bumps(rng, 5, 0.08))
    notches = {
        "spleen": _Blob(centre - 1.35 * spleen_r[0] * axes[:, 0], spleen_r * [1.0, 0.6, 0.55], axes),
    }
    for side in ("kidney_right", "kidney_left"):
        k = organs[side]
        medial = -k.axes[:, 0]  # local axis 0 points laterally
        notches[side] = _Blob(k.centre + 1.05 * k.radii[0] * medial, k.radii * [0.45, 0.55, 0.3], k.axes)

    # pancreas: tail at the splenic hilum, body anterior to the aorta, head in the duodenal C-loop
    control = np.array([
        [-70 * sx, -8 * sy, 18], [-35 * sx, 6 * sy, 14], [-8, spine_y + spine_r + 2 * aorta_r + 14, 6],
        [14, spine_y + spine_r + 2 * aorta_r + 12, 0], [28 * sx, 2 * sy, -8],
    ]) + rng.normal(0.0, 3.5, (5, 3))
    control[2, 0] = rng.uniform(-12.0, -4.0)  # keep the body across the midline
    radii = np.array([9.0, 10.5, 11.0, 12.0, 15.0]) * g * np.exp(rng.normal(0.0, 0.08, 5))
    organs["pancreas"] = _Tube(*_smooth_path(control, radii))

    stomach = _blob(rng, (-42 * sx, 34 * sy, 45), np.array([40, 28, 40]), (0, 0, -30), amp=0.12)
    head = control[-1]
    duodenum_path = head + np.array([[-12, 26, 20], [14, 16, 14], [24, 0, 0], [20, -4, -22], [-4, -2, -30],
                                     [-34, 4, -28], [-50, 10, -20]]) + rng.normal(0.0, 3.0, (7, 3))
    duodenum = _Tube(*_smooth_path(duodenum_path, np.full(7, rng.uniform(8.0, 11.0))))
    liver_c = organs["liver_right"].centre
    portal_path = np.array([[control[3, 0] - 6, control[3, 1] - 14, 2], [liver_c[0] - 25, liver_c[1] + 5, 18],
                            [liver_c[0] - 5, liver_c[1] + 5, 28]])
    portal_vein = _Tube(*_smooth_path(portal_path, np.array([7.0, 6.0, 4.0])))

    lo, hi = np.array([-a, -b, -200.0]), np.array([a, b * 1.1, 200.0])
    return _Anatomy(
        body=body, spine_y=spine_y, spine_r=spine_r,
        vertebra_period=rng.uniform(30.0, 35.0), vertebra_phase=rng.uniform(0.0, 35.0),
        rib_pitch=rng.uniform(28.0, 34.0), rib_phase=rng.uniform(0.0, 34.0),
        aorta=aorta, ivc=ivc, organs=organs, notches=notches,
        stomach=stomach, stomach_gas=bool(rng.random() < 0.7), duodenum=duodenum, portal_vein=portal_vein,
        bowel=_Field.draw(rng, lo, hi, 9.0), gas=_Field.draw(rng, lo, hi, 6.0),
        vessels=(_Field.draw(rng, lo, hi, 7.0), _Field.draw(rng, lo, hi, 7.0)),
    )


# --- painting the anatomy onto a grid ---------------------------------------------------------


class _Canvas:
    """Tissue and label volumes being painted; what is painted later wins."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.tissue = np.full(grid.shape, _T.AIR, dtype=np.uint8)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.cavity = np.zeros(grid.shape, dtype=bool)

    def region(self, shape: _Blob | _Tube):
        box = self.grid.box(*shape.bounds())
        if box is None:
            return None, None
        return box, self.grid.coords(box)

    def paint(self, box, mask, tissue: _Tissue, label: int | None = None) -> None:
        """Set ``tissue`` where ``mask`` holds within ``box``, and ``label`` unless None (an
        organ's inner structure keeps the organ's label)."""
        self.tissue[box][mask] = tissue
        if label is not None:
            self.label[box][mask] = label


def _paint(anatomy: _Anatomy, grid: _Grid, *, table: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (uint8, :class:`_Tissue`) and label map (uint8, :data:`PHANTOM_LABELS`)."""
    canvas = _Canvas(grid)
    body = anatomy.body
    full = grid.full
    x, y, z = grid.coords(full)

    # body wall: skin/subcutaneous fat, muscle, then the cavity (visceral fat by default)
    canvas.paint(full, body.level(x, y, z) < 1, _T.FAT)
    wall = body.level(x, y, z, body.fat_lat, body.fat_ant, body.fat_post) < 1
    canvas.paint(full, wall, _T.MUSCLE)
    cavity = body.cavity_level(x, y, z) < 1
    canvas.cavity = cavity
    canvas.paint(full, cavity, _T.VISCERAL_FAT)
    if table:  # a curved CT table plate under the patient
        plate = (y < -body.b_post - 4) & (y > -body.b_post - 10) & (np.abs(x) < 0.8 * body.a)
        canvas.paint(full, plate, _T.TABLE)

    # ribs: oblique bands in the muscle wall, descending anteriorly, above the costal margin
    phi = np.arctan2(np.abs(x), -y)  # 0 at the spine, pi at the front
    rib_band = np.mod(z + 25.0 * phi + anatomy.rib_phase, anatomy.rib_pitch) < 0.3 * anatomy.rib_pitch
    ribs = wall & ~cavity & rib_band & (z > 5.0 + 28.0 * phi) & (phi > 0.45)
    ribs &= body.level(x, y, z, body.fat_lat + 3, body.fat_ant + 3, body.fat_post + 3) < 1
    canvas.paint(full, ribs, _T.RIB)
    del x, y, z, phi, rib_band, ribs, wall

    # bowel loops and gas fill the lower and anterior cavity
    box = grid.box(np.array([-body.a, anatomy.spine_y - 10.0, -300.0]), np.array([body.a, body.b_ant, 40.0]))
    if box is not None:
        bx, by, bz = grid.coords(box)
        loops = (anatomy.bowel.sample(bx, by, bz) > 0.1 - 0.004 * np.minimum(bz, 0)) & canvas.cavity[box]
        loops &= by > anatomy.spine_y + 5 - 0.5 * np.maximum(np.abs(bx) - 40.0, 0)
        canvas.paint(box, loops, _T.BOWEL)
        canvas.paint(box, loops & (anatomy.gas.sample(bx, by, bz) > 1.6), _T.GAS)

    # back muscles: erector spinae, quadratus lumborum, psoas (growing inferiorly)
    yv, rv = anatomy.spine_y, anatomy.spine_r
    box = grid.box(np.array([-body.a, -body.b_post, -300.0]), np.array([body.a, yv + 40.0, 300.0]))
    if box is not None:
        bx, by, bz = grid.coords(box)
        ax = np.abs(bx)
        erector = ((ax - 34.0) / 22.0) ** 2 + ((by - (yv - rv - 30.0)) / 17.0) ** 2 < 1
        quadratus = (((ax - 58.0) / 14.0) ** 2 + ((by - (yv - 14.0)) / 9.0) ** 2 < 1) & (bz < 10)
        psoas_r = np.clip(6.0 + 0.16 * (30.0 - bz), 0.0, 22.0)
        psoas = (ax - (rv + 10.0 + 0.5 * psoas_r)) ** 2 + ((by - (yv + 4.0)) / 0.85) ** 2 < psoas_r**2
        psoas &= bz < 40
        canvas.paint(box, (erector | quadratus | psoas) & (body.level(bx, by, bz) < 1), _T.MUSCLE)

    # stomach (gas rises anteriorly in a supine patient) and duodenum
    box, c = canvas.region(anatomy.stomach)
    if box is not None:
        lev = anatomy.stomach.level(*c)
        inside = (lev < 1) & canvas.cavity[box]
        canvas.paint(box, inside, _T.BOWEL)
        lumen = inside & (lev < 0.85)
        canvas.paint(box, lumen, _T.FLUID)
        if anatomy.stomach_gas:
            top = anatomy.stomach.centre[1] + 0.35 * anatomy.stomach.radii[1]
            canvas.paint(box, lumen & (c[1] > top), _T.GAS)
    box, c = canvas.region(anatomy.duodenum)
    if box is not None:
        lev = anatomy.duodenum.level(*c)
        canvas.paint(box, (lev < 1) & canvas.cavity[box], _T.BOWEL)
        canvas.paint(box, (lev < 0.55) & canvas.cavity[box], _T.FLUID)

    organs, labels = anatomy.organs, PHANTOM_LABELS
    # liver (two lobes) with intrahepatic vessels; vessel tubes are where two smooth fields cross zero
    for lobe in ("liver_right", "liver_left"):
        box, c = canvas.region(organs[lobe])
        if box is None:
            continue
        inside = (organs[lobe].level(*c) < 1) & canvas.cavity[box]
        canvas.paint(box, inside, _T.LIVER, labels["liver"])
        f1, f2 = (f.sample(*c) for f in anatomy.vessels)
        canvas.paint(box, inside & (np.abs(f1) < 0.12) & (np.abs(f2) < 0.35), _T.LIVER_VESSEL)

    box, c = canvas.region(organs["spleen"])
    if box is not None:
        inside = organs["spleen"].level(*c) < 1
        inside &= (anatomy.notches["spleen"].level(*c) >= 1) & canvas.cavity[box]
        canvas.paint(box, inside, _T.SPLEEN, labels["spleen"])

    box, c = canvas.region(organs["gallbladder"])
    if box is not None:
        lev = organs["gallbladder"].level(*c)
        canvas.paint(box, (lev < 1) & canvas.cavity[box], _T.BILE, labels["gallbladder"])

    for side in ("kidney_right", "kidney_left"):
        kidney = organs[side]
        box, c = canvas.region(kidney)
        if box is None:
            continue
        lev = kidney.level(*c)
        inside = (lev < 1) & (anatomy.notches[side].level(*c) >= 1) & canvas.cavity[box]
        canvas.paint(box, inside, _T.KIDNEY_CORTEX, labels[side])
        canvas.paint(box, inside & (lev < 0.72), _T.KIDNEY_MEDULLA)
        q = kidney.local(*c)
        pelvis = inside & (lev < 0.6) & (q[0] < -0.15) & (np.abs(q[2]) < 0.35)  # toward the hilum
        canvas.paint(box, pelvis, _T.FLUID)

    # portal vein: liver where it runs inside the liver, background outside any organ
    box, c = canvas.region(anatomy.portal_vein)
    if box is not None:
        tube = anatomy.portal_vein.level(*c) < 1
        canvas.paint(box, tube & (canvas.label[box] == labels["liver"]), _T.LIVER_VESSEL)
        canvas.paint(box, tube & (canvas.label[box] == 0) & canvas.cavity[box], _T.VEIN)

    box, c = canvas.region(organs["pancreas"])
    if box is not None:
        inside = (organs["pancreas"].level(*c) < 1) & canvas.cavity[box]
        canvas.paint(box, inside, _T.PANCREAS, labels["pancreas"])

    # great vessels and spine override everything
    box = grid.box(np.array([-60.0, yv - 60.0, -300.0]), np.array([60.0, yv + 60.0, 300.0]))
    if box is not None:
        bx, by, bz = grid.coords(box)
        xa, ya, ra = anatomy.aorta
        xa = xa + 0.03 * bz  # the aorta drifts slightly along the spine
        canvas.paint(box, (bx - xa) ** 2 + (by - ya) ** 2 < ra**2, _T.AORTA, 0)
        xi, yi, rxi, ryi = anatomy.ivc
        canvas.paint(box, ((bx - xi) / rxi) ** 2 + ((by - yi) / ryi) ** 2 < 1, _T.VEIN, 0)

        phase = np.mod(bz - anatomy.vertebra_phase, anatomy.vertebra_period) / anatomy.vertebra_period
        disc = phase < 0.22
        r_body = np.hypot(bx, by - yv) / rv
        canvas.paint(box, (r_body < 1) & ~disc, _T.CORTICAL_BONE, 0)
        canvas.paint(box, (r_body < 0.82) & ~disc, _T.MARROW, 0)
        canvas.paint(box, (r_body < 1) & disc, _T.DISC, 0)
        yc = yv - rv - 9.0  # spinal canal
        r_canal = np.hypot(bx, by - yc)
        posterior = (phase > 0.3) & (phase < 0.9)
        arch = (r_canal < 14.0) & (by < yc + 5.0)
        pedicles = (np.abs(bx) > 5.0) & (np.abs(bx) < 12.0) & (by >= yc) & (by < yv - rv + 2)
        spinous = (bx / 4.5) ** 2 + ((by - (yc - 20.0)) / 12.0) ** 2 < 1
        transverse = ((np.abs(bx) - 25.0) / 14.0) ** 2 + ((by - (yc + 2.0)) / 4.0) ** 2 < 1
        canvas.paint(box, arch | pedicles | (posterior & (spinous | transverse)), _T.CORTICAL_BONE, 0)
        canvas.paint(box, r_canal < 8.0, _T.CSF, 0)
    return canvas.tissue, canvas.label


# --- acquisition: grids, poses, rendering ---------------------------------------------------


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


# --- public API ---------------------------------------------------------------------------------


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


def _case_seed(seed: int, modality: str, index: int) -> int:
    """The seed of case ``index`` of a dataset: its own patient, per modality and index."""
    return int(np.random.SeedSequence([seed, _MODALITY_CODE[modality], index]).generate_state(1)[0])


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _check_replaceable(target: Path) -> None:
    """Only an absent or empty folder, or an earlier phantom dataset, may be (re)written."""
    if not target.exists():
        return
    if not target.is_dir():
        raise DataError(target, "exists and is not a folder; refusing to overwrite it")
    if not any(target.iterdir()):
        return
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        raise DataError(target, "exists and is not a fedgin phantom dataset; refusing to overwrite it")


def _write_dataset(root: Path, name: str, modality: str, n: int, seed: int,
                   annotated: tuple[str, ...]) -> None:
    prefix = "phantom_ct" if modality == "CT" else "phantom_mr"
    entries = []
    for index in range(n):
        case_seed = _case_seed(seed, modality, index)
        case = make_phantom(case_seed, modality, case_id=f"{prefix}_{index:03d}")
        label = case.label
        unknown = [PHANTOM_LABELS[o] for o in ORGANS if o not in annotated]
        if unknown:
            label = np.where(np.isin(label, unknown), 0, label).astype(np.uint8)  # unknown, stored as 0
        image_rel = f"imagesTr/{case.case_id}_0000.nii.gz"
        label_rel = f"labelsTr/{case.case_id}.nii.gz"
        write_volume(root / image_rel, case.image, case.affine, dtype=np.int16)
        write_volume(root / label_rel, label, case.affine, dtype=np.uint8)
        counts = np.bincount(label.ravel(), minlength=len(PHANTOM_LABELS))
        entries.append({
            "case": case.case_id,
            "image": image_rel,
            "label": label_rel,
            "annotated": list(annotated),
            "modality": modality,
            "shape": list(case.image.shape),
            "spacing": [round(s, 6) for s in spacing_of(case.affine)],
            "axcodes": axcodes_of(case.affine),
            "seed": case_seed,
            "image_dtype": "int16",
            "label_dtype": "uint8",
            "voxel_counts": {o: int(counts[PHANTOM_LABELS[o]]) for o in ORGANS},
        })
    channel = "CT" if modality == "CT" else "MRI"
    partial = "" if annotated == ORGANS else (
        f" Only {', '.join(annotated)} are annotated; the other organs are unknown"
        " (stored as 0), see manifest.json."
    )
    _write_json(root / "dataset.json", {
        "name": name,
        "description": f"Synthetic abdominal {channel} phantoms generated by {GENERATOR} (seed {seed}); "
                       f"no patient data.{partial}",
        "channel_names": {"0": channel},
        "labels": dict(PHANTOM_LABELS),
        "numTraining": n,
        "file_ending": ".nii.gz",
        "licence": "synthetic data, no restrictions",
    })
    _write_json(root / "manifest.json", {
        "generator": GENERATOR,
        "seed": seed,
        "modality": modality,
        "labels": dict(PHANTOM_LABELS),
        "partial_annotation": "An organ not in a case's `annotated` is unknown: its voxels are stored as 0.",
        "reproduce": "fedgin.data.phantoms.make_phantom(case['seed'], case['modality'])",
        "cases": entries,
    })


def write_phantom_datasets(out: str | Path, n_ct: int = 6, n_mri: int = 6, seed: int = 0, *,
                           mri_partial: bool = False) -> list[Path]:
    """Write a CT and an MRI phantom site as nnU-Net v2 raw datasets under ``out``.

    Writes ``out/Dataset901_PhantomCT`` and ``out/Dataset902_PhantomMR``, each with
    ``dataset.json``, ``imagesTr/{case}_0000.nii.gz`` (int16: HU, or MRI units),
    ``labelsTr/{case}.nii.gz`` (uint8, :data:`PHANTOM_LABELS`) and ``manifest.json`` (per case:
    annotated organs, modality, shape, spacing, axis codes, seed). Case ``i`` of a modality is
    ``make_phantom(seed derived from (seed, modality, i))``, so the two sites share no patient.

    Each dataset is built in a temporary folder and moved into place, so a failure leaves no half
    dataset; an existing folder is replaced only if it is empty or an earlier phantom dataset.

    Args:
        mri_partial: the MRI site annotates only liver and kidneys and spleen, as CHAOS MRI;
            pancreas and gallbladder voxels are stored as 0 (unknown).

    Returns:
        The CT and the MRI dataset folders.
    """
    seed = _check_seed(seed)
    for name, n in (("n_ct", n_ct), ("n_mri", n_mri)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise FedginError(f"{name} must be a positive integer, got {n!r}")
    out = Path(out)
    plan = [
        (CT_DATASET, "CT", int(n_ct), ORGANS),
        (MRI_DATASET, "MRI", int(n_mri), MRI_PARTIAL_ORGANS if mri_partial else ORGANS),
    ]
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    for name, *_ in plan:
        _check_replaceable(out / name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, modality, n, annotated in plan:
        target = out / name
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out))
        try:
            _write_dataset(staging, name, modality, n, seed, annotated)
            if target.exists():
                retired = out / f".old-{name}-{os.getpid()}-{time.monotonic_ns()}"
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        written.append(target)
    return written
