"""Geometry of the phantoms: rotations, scanner grids (voxel <-> patient frame) and the shapes
organs are built from (bumpy ellipsoids, tubes around smooth paths, smooth random fields).

Coordinates are NIfTI RAS+ mm, in the patient frame or in world (see :mod:`fedgin.synthetic.phantom`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


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
