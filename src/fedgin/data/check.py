"""``fedgin data check``: validate datasets and print a case table.

Besides errors (a case that cannot be read or mapped), it warns about labelled voxels outside the
body's bounding box (:func:`fedgin.data.preprocess.body_box`): training still sees them (its plane
includes every label), but a prediction only covers the body, so such labels (a mask on air, a
label misaligned with its image) are never predicted."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, FedginError
from .datasets import check_label_map_names, open_dataset
from .labels import LabelScheme
from .nifti import axcodes_of, spacing_of
from .preprocess import labels_outside_body


@dataclass
class CaseRow:
    dataset: str
    case: str
    modality: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    axcodes: str
    present: tuple[str, ...]
    annotated: tuple[str, ...]
    outside_body: int = 0  # labelled voxels outside the body's bounding box


def check_datasets(paths: list[str], scheme: LabelScheme,
                   label_map: Mapping[str, str] | None = None) -> tuple[list[CaseRow], list[str]]:
    """Read every case fully (image, label, mapping); returns rows and one error line per bad case.

    ``label_map`` is ``--label-map``'s; a name of it that no dataset labels is one more error line."""
    rows, errors = [], []
    inv = {i: o for o, i in scheme.label_ids.items()}
    opened = []
    for path in paths:
        try:
            dataset = open_dataset(path, scheme, label_map=label_map)
        except FedginError as exc:
            errors.append(str(exc))
            continue
        opened.append(dataset)
        for ref in dataset.cases + dataset.test_cases:
            try:
                image, label, affine = ref.read(scheme)
            except FedginError as exc:
                errors.append(str(exc))
                continue
            present = ()
            if label is not None:
                present = tuple(inv[int(i)] for i in np.unique(label) if i > 0)
                # a class counts as listed if any of its fine organs is (abdomen5 kidneys, one kidney annotated)
                listed = ref.annotated if ref.annotated_fine is None else {
                    o for o, fines in scheme.members if set(fines) & set(ref.annotated_fine)}
                stray = [o for o in present if o not in listed]
                if stray:
                    errors.append(str(DataError(ref.label, f"labels organ(s) {stray} that the manifest "
                                                            "does not list as annotated")))
                    continue
            outside = labels_outside_body(image, affine, ref.modality, label) if present else 0
            rows.append(CaseRow(dataset.name, ref.case_id, ref.modality, tuple(image.shape),
                                tuple(round(s, 3) for s in spacing_of(affine)), axcodes_of(affine),
                                present, ref.annotated, outside))
    if len(opened) == len(paths):  # a dataset that did not open has labels we cannot know
        try:
            check_label_map_names(label_map, opened)
        except FedginError as exc:
            errors.append(str(exc))
    return rows, errors


def warning_lines(rows: list[CaseRow]) -> list[str]:
    """One line per case with labelled voxels outside the body (see the module docstring)."""
    return [f"{r.dataset}/{r.case}: {r.outside_body} labelled voxel(s) lie outside the body's bounding box; "
            "training sees them, prediction does not (a label on air, or misaligned with its image?)"
            for r in rows if r.outside_body]


def summary_line(rows: list[CaseRow], errors: list[str], n_datasets: int) -> str:
    """The last line of ``fedgin data check``: FAILED with the counts, or OK with what was read."""
    if errors:
        return f"FAILED: {len(errors)} problem(s), {len(rows)} good case(s)"
    mods = sorted({r.modality for r in rows})
    return f"OK: {len(rows)} cases in {n_datasets} dataset(s) ({', '.join(mods)}), all readable and mapped"


def format_table(rows: list[CaseRow], scheme: LabelScheme) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cases (scheme {scheme.name}; organs: present/annotated, '?' = not annotated)")
    for col in ("dataset", "case", "modality", "shape", "spacing (mm)", "axes", "organs"):
        table.add_column(col)
    for r in rows:
        organs = []
        for o in scheme.organs:
            if o not in r.annotated:
                organs.append(f"{o}:?")
            else:
                organs.append(f"{o}:{'yes' if o in r.present else 'no'}")
        table.add_row(r.dataset, r.case, r.modality, "x".join(map(str, r.shape)),
                      "x".join(f"{s:g}" for s in r.spacing), r.axcodes, " ".join(organs))
    console = Console(width=200, record=True, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    return cap.get()
