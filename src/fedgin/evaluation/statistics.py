"""Organ statistics of a label map on its image's grid: per organ the volume in ml and the mean and
sd of the image intensity inside it (HU for CT, the scanner's units for MRI), with plausibility
warnings for an organ far outside the usual adult range.

``fedgin predict --statistics`` writes ``{case}.statistics.json`` next to ``{case}.nii.gz``;
``fedgin evaluate`` always writes them, to ``statistics/{case}.statistics.json`` of its output
folder, and adds each case's statistics to its record in ``summary.json``. A warning never stops
anything: a scan that shows only part of an organ, a resected organ or a child warns too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..data.labels import LabelScheme

#: Usual adult volumes (ml) widened on purpose, so that only a gross miss or leak warns: each
#: range reaches well below the smallest and above the largest volume of healthy adults (and
#: covers moderate organ enlargement). Approximate normal values they were set against:
#: - liver: about 1,000-2,000 ml (CT volumetry; Heinemann et al., Liver Transpl Surg 1999, "Standard
#:   liver volume in the Caucasian population"), hepatomegaly to about 3,000 ml;
#: - spleen: about 100-350 ml, mean about 215 ml (Prassopoulos et al., Eur Radiol 1997, normal
#:   splenic volume on CT); splenomegaly over 500 ml, massive ones over 1,000 ml are left to warn;
#: - kidneys: about 120-200 ml each (Emamian et al., AJR 1993, kidney dimensions in 665 adults),
#:   so both together about 240-400 ml;
#: - pancreas: about 50-100 ml, falling with age (Saisho et al., Clin Anat 2007, pancreas volume by
#:   CT from birth to age 100);
#: - gallbladder: about 15-60 ml fasting, much less after a meal (ultrasound volumetry).
PLAUSIBLE_ML: dict[str, tuple[float, float]] = {
    "liver": (800.0, 3000.0),
    "spleen": (50.0, 1000.0),
    "kidneys": (140.0, 600.0),  # both kidneys (abdomen5's one class)
    "kidney_right": (70.0, 300.0),
    "kidney_left": (70.0, 300.0),
    "pancreas": (30.0, 150.0),
    "gallbladder": (5.0, 150.0),
}

STATISTICS_SUFFIX = ".statistics.json"
#: Where ``fedgin evaluate`` writes them in its output folder.
STATISTICS_DIR = "statistics"


def voxel_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in ml (the affine is in mm: 1 ml = 1,000 mm^3)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def intensity_unit(modality: str) -> str:
    return "HU" if modality == "CT" else "scanner units (MRI intensities have no absolute scale)"


def organ_statistics(labels: np.ndarray, image: np.ndarray | None, affine: np.ndarray,
                     scheme: LabelScheme) -> dict[str, dict]:
    """``{organ: {voxels, volume_ml, mean, sd}}`` of every organ of ``scheme`` in ``labels``; mean
    and sd (population sd) of ``image`` inside the organ, None where the organ is empty or there
    is no image. ``labels`` and ``image`` share one grid."""
    per_voxel = voxel_ml(affine)
    counts = np.bincount(labels.ravel(), minlength=scheme.num_classes)
    out: dict[str, dict] = {}
    for organ, idx in scheme.label_ids.items():
        if idx == 0:
            continue
        n = int(counts[idx]) if idx < len(counts) else 0
        mean = sd = None
        if n and image is not None:
            values = image[labels == idx].astype(np.float64)
            mean, sd = float(values.mean()), float(values.std())
        out[organ] = {"voxels": n, "volume_ml": n * per_voxel, "mean": mean, "sd": sd}
    return out


def plausibility_warnings(organs: dict[str, dict]) -> list[str]:
    """One sentence per organ of :func:`organ_statistics` whose volume is outside :data:`PLAUSIBLE_ML`."""
    warnings = []
    for organ, stats in organs.items():
        if organ not in PLAUSIBLE_ML:
            continue
        low, high = PLAUSIBLE_ML[organ]
        ml = stats["volume_ml"]
        if low <= ml <= high:
            continue
        usual = f"the usual adult range of {low:.0f}-{high:.0f} ml"
        if ml == 0:
            warnings.append(f"{organ} not found (0 ml), outside {usual}")
        else:
            shown = f"{ml:.0f}" if ml >= 10 else f"{ml:.1f}"
            warnings.append(f"{organ} {shown} ml, far {'below' if ml < low else 'above'} {usual}")
    return warnings


def case_statistics(case: str, modality: str, labels: np.ndarray, image: np.ndarray | None,
                    affine: np.ndarray, scheme: LabelScheme, reference: np.ndarray | None = None) -> dict:
    """What ``{case}.statistics.json`` holds: the predicted organs' :func:`organ_statistics`, the
    warnings, and with a ``reference`` each organ's reference volume (``reference_ml``)."""
    organs = organ_statistics(labels, image, affine, scheme)
    if reference is not None:
        per_voxel = voxel_ml(affine)
        counts = np.bincount(reference.ravel(), minlength=scheme.num_classes)
        for organ, stats in organs.items():
            stats["reference_ml"] = int(counts[scheme.label_ids[organ]]) * per_voxel
    return {"case": case, "modality": modality, "intensity": intensity_unit(modality),
            "voxel_ml": voxel_ml(affine), "organs": organs, "warnings": plausibility_warnings(organs),
            "plausible_ml": {o: list(PLAUSIBLE_ML[o]) for o in organs if o in PLAUSIBLE_ML}}


def write_statistics(path: Path, statistics: dict) -> Path:
    return write_text(path, json.dumps(statistics, indent=2))


def statistics_path(folder: Path, case: str) -> Path:
    return Path(folder) / f"{case}{STATISTICS_SUFFIX}"
