"""Label schemes and the one declared mapping table per data source.

A *scheme* is the model's label space (``abdomen5`` by default, the FedGIN paper's five organs).
Every source (nnU-Net ``dataset.json`` label names, TotalSegmentator mask files, AMOS label ids)
is described in terms of *fine organ names* (``kidney_right``, ``kidney_left``, ...) and a scheme
folds fine organs into its own classes (``abdomen5`` merges both kidneys into ``kidneys``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import FedginError

#: Fine organ names every source is first mapped to.
FINE_ORGANS: tuple[str, ...] = (
    "liver",
    "kidney_right",
    "kidney_left",
    "spleen",
    "pancreas",
    "gallbladder",
)

#: Spellings found in public datasets -> fine organ name.
ORGAN_ALIASES: dict[str, str] = {
    "liver": "liver",
    "kidney_right": "kidney_right",
    "right_kidney": "kidney_right",
    "kidney_r": "kidney_right",
    "rk": "kidney_right",
    "kidney_left": "kidney_left",
    "left_kidney": "kidney_left",
    "kidney_l": "kidney_left",
    "lk": "kidney_left",
    "spleen": "spleen",
    "pancreas": "pancreas",
    "gallbladder": "gallbladder",
    "gall_bladder": "gallbladder",
    "gall bladder": "gallbladder",
    # a source that labels both kidneys as one structure
    "kidneys": "kidneys",
    "kidney": "kidneys",
}

#: Structures that public datasets label but no scheme segments: stored as background.
NON_TARGET_STRUCTURES: frozenset[str] = frozenset(
    {
        "esophagus",
        "stomach",
        "aorta",
        "postcava",
        "inferior_vena_cava",
        "ivc",
        "portal_vein_and_splenic_vein",
        "right_adrenal_gland",
        "left_adrenal_gland",
        "adrenal_gland_right",
        "adrenal_gland_left",
        "duodenum",
        "bladder",
        "urinary_bladder",
        "prostate/uterus",
        "prostate",
        "uterus",
    }
)


@dataclass(frozen=True)
class LabelScheme:
    """A model's label space: class 0 is background, classes 1..N are ``organs`` in order.

    ``members`` maps each class name to the fine organs it contains.
    """

    name: str
    organs: tuple[str, ...]
    members: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def num_classes(self) -> int:
        """Background plus organs."""
        return len(self.organs) + 1

    @property
    def label_ids(self) -> dict[str, int]:
        """``{"background": 0, organ: id, ...}`` as written to ``labels.json``."""
        return {"background": 0, **{o: i + 1 for i, o in enumerate(self.organs)}}

    @property
    def expected_components(self) -> dict[str, int]:
        """``{organ: n}``: the separate structures a class holds in one patient, one per fine organ
        (``abdomen5``'s ``kidneys``: 2). Post-processing keeps at most that many components."""
        return {organ: len(fines) for organ, fines in self.members}

    def class_of_fine(self, fine: str) -> str:
        """The scheme class holding fine organ ``fine``."""
        for organ, fines in self.members:
            if fine in fines:
                return organ
        raise KeyError(fine)

    def id_of_fine(self, fine: str) -> int:
        return self.label_ids[self.class_of_fine(fine)]

    def classes_of_names(self, names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """Scheme classes fully covered by source structure names (aliases allowed).

        A class is annotated only if all of its fine organs are: ``abdomen5``'s ``kidneys`` needs
        both kidneys annotated.
        """
        fines: set[str] = set()
        for name in names:
            fines.update(expand_fine(name))
        return tuple(o for o, members in self.members if set(members) <= fines)

    def to_dict(self) -> dict:
        return {"name": self.name, "organs": list(self.organs), "labels": self.label_ids}


def expand_fine(name: str) -> tuple[str, ...]:
    """Fine organs named by ``name`` (an alias); ``()`` for a known non-target structure."""
    key = name.strip().lower()
    if key in NON_TARGET_STRUCTURES:
        return ()
    fine = ORGAN_ALIASES.get(key)
    if fine is None:
        raise KeyError(name)
    if fine == "kidneys":
        return ("kidney_right", "kidney_left")
    return (fine,)


#: The ``--label-map`` target that turns a source label's voxels into background.
BACKGROUND = "background"


def normalise_label_map(label_map: Mapping[str, str] | None) -> dict[str, str]:
    """``{source label name: target}`` with lower-case names and checked targets (``background`` or
    any name :func:`expand_fine` knows); a usage error naming the bad entry otherwise."""
    out: dict[str, str] = {}
    for name, target in (label_map or {}).items():
        key, value = str(name).strip().lower(), str(target).strip().lower()
        if not key or not value:
            raise FedginError(f"--label-map takes NAME=ORGAN or NAME=background, got {name}={target}")
        if key == BACKGROUND:
            raise FedginError("--label-map cannot remap 'background' (label 0)")
        if value != BACKGROUND:
            try:
                expand_fine(value)
            except KeyError:
                raise FedginError(f"--label-map {name}={target}: unknown organ {target!r}; expected background "
                                  f"or one of {', '.join(FINE_ORGANS)}, kidneys (or an alias of one)") from None
        if out.get(key, value) != value:
            raise FedginError(f"--label-map maps {name!r} twice ({out[key]} and {value})")
        out[key] = value
    return out


def parse_label_map(entries: Iterable[str] | None) -> dict[str, str] | None:
    """``--label-map`` arguments (``NAME=ORGAN`` or ``NAME=background``) as a checked
    :func:`normalise_label_map` dict; None when there are none."""
    out: dict[str, str] = {}
    for entry in entries or ():
        name, sep, target = str(entry).partition("=")
        if not sep or not name.strip() or not target.strip():
            raise FedginError(f"--label-map takes NAME=ORGAN or NAME=background, got {entry!r}")
        ((key, value),) = normalise_label_map({name: target}).items()
        if out.get(key, value) != value:
            raise FedginError(f"--label-map maps {name.strip()!r} twice ({out[key]} and {value})")
        out[key] = value
    return out or None


def fines_of_label(name: str, label_map: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Fine organs a source label ``name`` holds: ``label_map`` (lower-case names, as
    :func:`normalise_label_map` gives) first, else the alias table; ``()`` for background.
    KeyError for a name neither knows."""
    target = (label_map or {}).get(name.strip().lower())
    if target is None:
        return expand_fine(name)
    return () if target == BACKGROUND else expand_fine(target)


SCHEMES: dict[str, LabelScheme] = {
    "abdomen5": LabelScheme(
        name="abdomen5",
        organs=("liver", "kidneys", "spleen", "pancreas", "gallbladder"),
        members=(
            ("liver", ("liver",)),
            ("kidneys", ("kidney_right", "kidney_left")),
            ("spleen", ("spleen",)),
            ("pancreas", ("pancreas",)),
            ("gallbladder", ("gallbladder",)),
        ),
    ),
    "abdomen6": LabelScheme(
        name="abdomen6",
        organs=FINE_ORGANS,
        members=tuple((o, (o,)) for o in FINE_ORGANS),
    ),
}

DEFAULT_SCHEME = "abdomen5"


def get_scheme(name: str) -> LabelScheme:
    """The scheme called ``name``; a usage error naming the known ones otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise FedginError(f"unknown label scheme {name!r}; known: {', '.join(SCHEMES)}") from None


# --- Source tables: source label -> fine organ name (None: background / not a target) ---------

#: TotalSegmentator: one mask file per structure in ``segmentations/``.
TOTALSEGMENTATOR_MASKS: dict[str, str] = {
    "liver.nii.gz": "liver",
    "kidney_right.nii.gz": "kidney_right",
    "kidney_left.nii.gz": "kidney_left",
    "spleen.nii.gz": "spleen",
    "pancreas.nii.gz": "pancreas",
    "gallbladder.nii.gz": "gallbladder",
}

#: AMOS 2022 label ids (its ``dataset.json``): the 15 abdominal structures.
AMOS_LABELS: dict[int, str | None] = {
    0: None,
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    4: "gallbladder",
    5: None,  # esophagus
    6: "liver",
    7: None,  # stomach
    8: None,  # aorta
    9: None,  # postcava
    10: "pancreas",
    11: None,  # right adrenal gland
    12: None,  # left adrenal gland
    13: None,  # duodenum
    14: None,  # bladder
    15: None,  # prostate/uterus
}

#: AMOS case ids from this number on are MRI.
AMOS_FIRST_MRI_ID = 500
