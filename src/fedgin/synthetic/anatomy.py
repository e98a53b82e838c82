"""The anatomy of a phantom: a random patient (body wall, spine, ribs, vessels, bowel and the six
labelled organs) drawn in the patient frame, and painted onto a scanner grid as tissue and label maps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .geometry import _Blob, _Field, _Grid, _Tube, _rotation, _smooth_path

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
