"""nnU-Net-style post-processing: keep only each organ's largest connected components, where the
validation cases show that doing so does not lower the organ's Dice.

A model's scattered false positives far from an organ barely move its Dice but ruin its HD95.
Each organ has a *candidate* post-processing (keep its ``n`` largest 3D components, ``n`` the
structures the class holds: one per fine organ, so 2 for ``abdomen5``'s merged ``kidneys``); the
:class:`PostprocessPlan` keeps the candidate for the organs where the mean validation Dice with it
is at least the Dice without it (:func:`decide_plan`). The plan travels inside the checkpoint and
``predict``/``evaluate`` apply it to the label map on the input's own grid.

Components are 26-connected (full 3D connectivity, ``skimage.measure.label``'s default): a part
of an organ that touches the rest only along an edge or corner (thin structures on coarse or
anisotropic grids) stays part of it, so the rule only removes what is truly detached.

Anatomy picks the component, not size alone (:data:`SIDE_OF_BODY`): the largest component of a
wrong prediction can be a far-away blob while the organ itself is a smaller one (a "spleen" in the
liver, HD95 over 150 mm). The liver and the gallbladder lie right of the body's midline, the spleen
left of it, one kidney on each side; so a lateral organ keeps its largest component(s) *on its side
of the body* (centroid in world RAS x against the body's centroid, :func:`body_side`), and only
when there are too few there the largest of the rest, as before. The rule needs the case's affine
and image (:class:`BodySide`); without them (a preprocessed plane in tests) it is the plain
largest-component rule.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..atomic import write_text
from ..data.body import BodySide
from ..data.labels import LabelScheme
from .inference import case_prediction
from .metrics import dice_score, mean_sd

#: Voxel connectivity of a component: 26 (faces, edges and corners) in 3D.
CONNECTIVITY = 26
_STRUCTURE = ndimage.generate_binary_structure(3, 3)

#: The decision rule, as written next to every decision.
RULE = ("per organ: keep its largest connected components (26-connected; as many as the structures "
        "its class holds; a lateral organ the largest on its side of the body's midline) where the "
        "mean validation Dice with it is >= the Dice without it")

#: Where an organ lies, left or right of the body's midline ("both": one structure on each side);
#: RAS world x grows to the patient's right. The midline (the body's centroid) is far from each
#: of these on the bundle's 23 cases: liver 30-95 mm right of it, spleen 45-110 mm left, kidneys
#: 25-70 mm each side. Organs not named (pancreas, which crosses the midline) keep the largest.
SIDE_OF_BODY = {"liver": "right", "gallbladder": "right", "spleen": "left", "kidneys": "both",
                "kidney_right": "right", "kidney_left": "left"}


def keep_largest_components(labels: np.ndarray, label_id: int, n: int, *, side: str | None = None,
                            body: BodySide | None = None) -> np.ndarray:
    """A copy of the label map ``labels`` (``X x Y x Z``, any integer dtype, any grid) where label
    ``label_id`` keeps only its ``n`` largest 26-connected components; the rest become background 0.
    With ``side`` ("right", "left", "both") and the case's ``body``, the components kept are the
    largest on that side of the body's midline (see the module docstring).

    Other labels are untouched; equal-sized components are ranked by their first voxel in C order,
    so the result is deterministic.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label map, got shape {labels.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = labels.copy()
    _keep_in_place(out, label_id, n, side, body)
    return out


def _bounding_box(labels: np.ndarray, label_id: int, slab: int = 32) -> tuple[slice, slice, slice] | None:
    """The box of ``label_id``'s voxels, found a slab of the last axis at a time (no full-size mask)."""
    rows = np.zeros(labels.shape[0], bool)
    cols = np.zeros(labels.shape[1], bool)
    planes = np.zeros(labels.shape[2], bool)
    for z0 in range(0, labels.shape[2], slab):
        mask = labels[:, :, z0:z0 + slab] == label_id
        rows |= mask.any(axis=(1, 2))
        cols |= mask.any(axis=(0, 2))
        planes[z0:z0 + slab] = mask.any(axis=(0, 1))
    if not rows.any():
        return None
    return tuple(slice(int(np.argmax(a)), len(a) - int(np.argmax(a[::-1]))) for a in (rows, cols, planes))


def _keep_in_place(labels: np.ndarray, label_id: int, n: int, side: str | None, body: BodySide | None) -> None:
    """:func:`keep_largest_components` on ``labels`` itself. Works inside the organ's bounding box
    (components cannot reach outside it), so a clinical-size volume costs the box, not the grid."""
    box = _bounding_box(labels, label_id)
    if box is None:
        return
    crop = labels[box]  # a view: clearing it clears ``labels``
    mask = crop == label_id
    components, count = ndimage.label(mask, structure=_STRUCTURE)
    if count <= n:
        return
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # component indices, largest first
    if side is None or body is None:
        keep = order[:n]
    else:
        offset = np.array([s.start for s in box], dtype=np.float64)
        centres = np.asarray(ndimage.center_of_mass(mask, components, np.arange(1, count + 1)),
                             dtype=np.float64).reshape(count, 3) + offset
        keep = _on_its_side(order, body.lateral_mm(centres), side, n)
    drop = np.ones(count + 1, bool)
    drop[0] = False
    drop[np.asarray(keep) + 1] = False
    crop[drop[components]] = 0


def _on_its_side(order: np.ndarray, lateral: np.ndarray, side: str, n: int) -> list[int]:
    """``n`` components (indices, ``order`` largest first): the largest on ``side`` ("both": the
    largest on each side first), then the largest of the rest."""
    wanted = {"right": [lateral > 0], "left": [lateral < 0], "both": [lateral > 0, lateral < 0]}[side]
    keep: list[int] = []
    for on_side in wanted * n:  # "both" with n = 2: right, left, right, left
        if len(keep) == n:
            break
        pick = next((int(i) for i in order if on_side[i] and int(i) not in keep), None)
        if pick is not None:
            keep.append(pick)
    keep += [int(i) for i in order if int(i) not in keep][: n - len(keep)]
    return keep


@dataclass(frozen=True)
class PostprocessPlan:
    """Which organs keep only their largest connected components, and how many.

    ``keep_largest`` maps organ name -> number of components kept (a mapping or ``(organ, n)``
    pairs; 0 or absent: no post-processing for that organ). ``sides`` maps a post-processed organ
    to the side of the body its components are chosen on (:data:`SIDE_OF_BODY`; absent: by size
    alone, as plans written before the side rule). The empty plan changes nothing.
    """

    keep_largest: tuple[tuple[str, int], ...] = ()
    sides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        items = self.keep_largest.items() if isinstance(self.keep_largest, Mapping) else self.keep_largest
        pairs = []
        for organ, n in items:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"post-processing of {organ}: components to keep must be an integer >= 0, got {n!r}")
            if n:
                pairs.append((str(organ), int(n)))
        object.__setattr__(self, "keep_largest", tuple(pairs))
        sides = dict(self.sides.items() if isinstance(self.sides, Mapping) else self.sides)
        for organ, side in sides.items():
            if side not in ("right", "left", "both"):
                raise ValueError(f"post-processing of {organ}: side must be right, left or both, got {side!r}")
        # in the order of keep_largest; an organ left alone has no side to choose on
        object.__setattr__(self, "sides", tuple((o, str(sides[o])) for o, _ in pairs if o in sides))

    @property
    def components(self) -> dict[str, int]:
        """``{organ: components kept}`` for the organs that are post-processed."""
        return dict(self.keep_largest)

    @property
    def empty(self) -> bool:
        return not self.keep_largest

    def __repr__(self) -> str:
        sides = dict(self.sides)
        kept = (f"{o}={n}" + (f" ({sides[o]})" if o in sides else "") for o, n in self.keep_largest)
        return f"PostprocessPlan({', '.join(kept)})"

    def describe(self) -> str:
        """The plan in words, as the console and the QA page print it, e.g. ``liver: keep the
        largest connected component; kidneys: keep the 2 largest connected components; every other
        organ as predicted``."""
        if self.empty:
            return "none: every organ as predicted"
        sides = dict(self.sides)
        where = {"right": " right of the body's midline", "left": " left of the body's midline",
                 "both": ", one on each side of the body's midline"}
        parts = [(f"{organ}: keep the largest connected component" if n == 1
                  else f"{organ}: keep the {n} largest connected components") + where.get(sides.get(organ), "")
                 for organ, n in self.keep_largest]
        return "; ".join(parts + ["every other organ as predicted"])

    __str__ = describe

    def to_dict(self) -> dict:
        return {"keep_largest_components": self.components, "side_of_body": dict(self.sides),
                "connectivity": CONNECTIVITY}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "PostprocessPlan":
        """The plan of :meth:`to_dict`; ``None`` or ``{}`` (checkpoints written before plans) is empty."""
        if not data:
            return cls()
        connectivity = data.get("connectivity", CONNECTIVITY)
        if connectivity != CONNECTIVITY:
            raise ValueError(f"post-processing connectivity {connectivity!r} is not supported (only {CONNECTIVITY})")
        return cls(dict(data.get("keep_largest_components") or {}), dict(data.get("side_of_body") or {}))

    def check(self, scheme: LabelScheme) -> None:
        """Refuse a plan naming an organ that ``scheme`` does not segment."""
        unknown = [o for o, _ in self.keep_largest if o not in scheme.organs]
        if unknown:
            raise ValueError(f"post-processing names {', '.join(unknown)}, not organs of label scheme {scheme.name}")

    def apply(self, labels: np.ndarray, scheme: LabelScheme, body: BodySide | None = None) -> np.ndarray:
        """The label map ``labels`` (``X x Y x Z`` in ``scheme``'s ids) post-processed; a new array,
        or ``labels`` itself when the plan is empty. The input is never modified. ``body``: the
        case's :class:`BodySide` on the grid of ``labels``, for the organs with a side (without
        it they keep their largest components)."""
        self.check(scheme)
        if self.empty:
            return labels
        if labels.ndim != 3:
            raise ValueError(f"expected a 3D label map, got shape {labels.shape}")
        sides = dict(self.sides)
        out = labels.copy()  # one copy for the whole plan
        for organ, n in self.keep_largest:
            _keep_in_place(out, scheme.label_ids[organ], n, sides.get(organ), body)
        return out


def candidate_plan(scheme: LabelScheme) -> PostprocessPlan:
    """Every organ's candidate post-processing: keep as many components as the class holds, a
    lateral organ (:data:`SIDE_OF_BODY`) on its side of the body."""
    return PostprocessPlan(scheme.expected_components,
                           {o: SIDE_OF_BODY[o] for o in scheme.organs if o in SIDE_OF_BODY})


def _score(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def decide_plan(scores_plain: Mapping[str, float | None], scores_pp: Mapping[str, float | None],
                scheme: LabelScheme) -> PostprocessPlan:
    """The plan from per-organ mean validation Dice without (``scores_plain``) and with
    (``scores_pp``) the candidate post-processing: an organ keeps its candidate where
    ``pp >= plain`` (as nnU-Net, a tie keeps it); an organ without both scores (absent, None or
    NaN: no annotated validation case) is not post-processed."""
    keep = {}
    for organ, n in scheme.expected_components.items():
        plain, pp = _score(scores_plain.get(organ)), _score(scores_pp.get(organ))
        if plain is not None and pp is not None and pp >= plain:
            keep[organ] = n
    return PostprocessPlan(keep, dict(candidate_plan(scheme).sides))


def validation_scores(model: torch.nn.Module, cases: list, scheme: LabelScheme,
                      device: torch.device) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Mean per-case 3D Dice per organ on validation cases, without and with each organ's
    candidate post-processing: ``(plain, pp)``, None where no case annotates the organ. A site's
    validation cases are predicted and post-processed on their input grid, as ``fedgin predict``
    does (:func:`fedgin.engine.inference.case_prediction`), so the plan is decided where it is
    applied. ``plain`` is exactly what :meth:`fedgin.engine.trainer.Trainer.validate` reports."""
    candidate = candidate_plan(scheme)
    plain: dict[str, list[float | None]] = {o: [] for o in scheme.organs}
    pp: dict[str, list[float | None]] = {o: [] for o in scheme.organs}
    for case in cases:
        pred, label = case_prediction(model, case, device)
        # one organ's candidate only clears that organ's voxels, so applying all at once leaves
        # every other organ's Dice as it was
        pred_pp = candidate.apply(pred, scheme, getattr(case, "body", None))
        for organ in scheme.organs:
            idx = scheme.label_ids[organ]
            if not case.annotated[idx]:
                continue
            ref = label == idx
            plain[organ].append(dice_score(pred == idx, ref))
            pp[organ].append(dice_score(pred_pp == idx, ref))
    return ({o: mean_sd(v)["mean"] for o, v in plain.items()},
            {o: mean_sd(v)["mean"] for o, v in pp.items()})


def decision_record(scheme: LabelScheme, plan: PostprocessPlan, scores_plain: Mapping[str, float | None] | None,
                    scores_pp: Mapping[str, float | None] | None, *, note: str | None = None, **context) -> dict:
    """What ``RUN/postprocess.json`` (and the checkpoint's meta) says: the plan, the rule, and per
    organ the validation Dice without and with the candidate and whether it is applied."""
    scores_plain, scores_pp = scores_plain or {}, scores_pp or {}
    return {
        "plan": plan.to_dict(),
        "rule": RULE,
        "validation_dice": {o: {"plain": _score(scores_plain.get(o)), "postprocessed": _score(scores_pp.get(o)),
                                "applied": o in plan.components} for o in scheme.organs},
        **context,
        "note": note,
    }


def write_decision(path: str | Path, record: dict) -> Path:
    """Write a :func:`decision_record` as JSON, atomically."""
    return write_text(path, json.dumps(record, indent=2))
