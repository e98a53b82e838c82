"""``fedgin evaluate --pred DIR --ref DATASET``: score label maps written by any tool.

The counterpart of ``nnUNetv2_evaluate_folder``, with ``fedgin evaluate --model``'s metrics and
files (``summary.json``, ``metrics.csv``, ``summary.md``). ``DIR`` holds one label map per case,
``{case_id}.nii.gz`` (or ``.nii``; no ``_0000`` suffix), on the reference case's grid (shape and
affine). Which organ a prediction id is: ``DIR/labels.json`` (``{name: id}``, as ``fedgin predict``
writes), else ``DIR/dataset.json``'s ``labels`` (``nnUNetv2_predict`` copies its model's there), else
the reference dataset's own label ids; ``--label-map`` applies to those names too. Predictions are
scored as they are: no post-processing.

A prediction may also be a DICOM SEG, ``{case_id}.seg.dcm`` (``fedgin predict --output-type
dicom-seg``) or ``{case_id}.dcm``: its segments say which organ they are (SNOMED CT code, else
segment label), and its frames are placed on the reference image's grid (a DICOM series' or a
NIfTI's), each on one slice, pixel for pixel; a SEG that does not lie on that grid is refused.

Where ``DIR`` has a ``provenance.json`` (``fedgin predict``), its model's label scheme, split seed,
split file and label map are the defaults, as ``--model`` takes them from the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from ..data.datasets import (
    CaseRef,
    Dataset,
    _read_json,
    check_label_map_names,
    check_same_grid,
    image_grid,
    is_seg_path,
    map_label_ids,
    open_dataset,
    read_image,
    read_raw_label,
    scheme_lut,
)
from ..data.labels import DEFAULT_SCHEME, LabelScheme, get_scheme
from ..data.nifti import read_header_info, spacing_of, spatial_shape
from ..engine.metrics import case_metrics
from ..errors import DataError, FedginError
from .prediction import NIFTI_ENDINGS, SEG_ENDING

#: Endings of prediction files: NIfTI label maps and DICOM SEGs.
PREDICTION_ENDINGS = NIFTI_ENDINGS + (SEG_ENDING, ".dcm")
from .qa import CaseRecorder, evaluation_page
from .scoring import cases_to_score, merged_label_map, write_evaluation

#: ``--cases`` for predictions: the labelled reference cases that have a prediction file (default),
#: or each reference's test split / every labelled case, all of which must have one.
PRED_CASES = ("predicted", "test", "all")


def prediction_files(folder: Path) -> dict[str, Path]:
    """``{case id: file}`` of the NIfTI files and DICOM SEGs in ``folder`` (case id: the name
    without ``.nii.gz``/``.nii``/``.seg.dcm``/``.dcm``)."""
    if not folder.exists():
        raise DataError(folder, "prediction folder not found")
    if not folder.is_dir():
        raise DataError(folder, "expected a folder of predictions ({case_id}.nii.gz or {case_id}.seg.dcm)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ending = next((e for e in PREDICTION_ENDINGS if path.name.lower().endswith(e)), None)
        if ending is None or not path.is_file():
            continue
        case = path.name[: -len(ending)]
        if case in files:
            raise DataError(path, f"a second prediction for case {case} (also {files[case].name})")
        files[case] = path
    if not files:
        raise DataError(folder, "no .nii, .nii.gz or DICOM SEG (.seg.dcm, .dcm) files in folder")
    return files


def read_provenance(folder: Path) -> dict:
    """``folder/provenance.json`` (``fedgin predict``'s), or ``{}`` where there is none."""
    path = folder / "provenance.json"
    return _read_json(path) if path.is_file() else {}


def prediction_labels(folder: Path) -> tuple[dict, Path] | None:
    """``{name: id}`` of the predictions and the file that says so: ``labels.json``, else the
    ``labels`` of a ``dataset.json`` in ``folder``; None where neither is there."""
    labels_json, dataset_json = folder / "labels.json", folder / "dataset.json"
    if labels_json.is_file():
        labels = _read_json(labels_json)
        return labels, labels_json
    if dataset_json.is_file():
        labels = _read_json(dataset_json).get("labels")
        if not isinstance(labels, dict):
            raise DataError(dataset_json, "labels must be an object of name -> id")
        return labels, dataset_json
    return None


def _pick_cases(opened: list[Dataset], files: dict[str, Path], folder: Path, *, cases: str, seed: int,
                split_file: str | None) -> list[CaseRef]:
    if cases == "predicted":
        labelled = cases_to_score(opened, cases="all")
        refs = [r for r in labelled if r.case_id in files]
        if not refs:
            raise DataError(folder, f"no prediction is named after a labelled reference case "
                                    f"(expected names such as {labelled[0].case_id}.nii.gz)")
    else:
        refs = cases_to_score(opened, cases=cases, seed=seed, split_file=split_file)
        missing = [r.case_id for r in refs if r.case_id not in files]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(folder, f"no prediction for {len(missing)} of {len(refs)} reference cases "
                                    f"({shown}); --cases predicted scores only the cases that have one")
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.case_id in seen:
            raise FedginError(f"case {ref.case_id} is in reference datasets {seen[ref.case_id]} and {ref.dataset}: "
                              "one prediction file cannot stand for both; evaluate them one --ref at a time")
        seen[ref.case_id] = ref.dataset
    return refs


def _check_grids(refs: list[CaseRef], files: dict[str, Path]) -> None:
    """Every prediction on its reference's grid, from the headers alone (before any scoring)."""
    for ref in refs:
        path = files[ref.case_id]
        ref_shape, ref_affine = image_grid(ref.image)
        if is_seg_path(path):
            from ..data.dicom_seg import check_seg_grid

            check_seg_grid(path, ref_shape, ref_affine)
            continue
        shape, affine = read_header_info(path)
        check_same_grid(path, ref_shape, ref_affine, spatial_shape(shape), affine,
                        what="prediction", against="reference")


def _luts(refs: list[CaseRef], files: dict[str, Path], folder: Path, scheme: LabelScheme,
          label_map: Mapping[str, str] | None, labels: tuple[dict, Path] | None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per case: the LUT prediction id -> scheme id, and what it comes from (for errors); a DICOM
    SEG's from its own segments."""
    out = {}
    for ref in refs:
        path = files[ref.case_id]
        if is_seg_path(path):
            from ..data.dicom_seg import read_segments

            out[ref.case_id] = (scheme_lut(read_segments(path), scheme, path, label_map)[0], f"{path.name}'s segments")
    if labels is not None:
        lut, _ = scheme_lut(labels[0], scheme, labels[1], label_map)
        return {r.case_id: out.get(r.case_id, (lut, labels[1].name)) for r in refs}
    for ref in refs:
        if ref.case_id in out:
            continue
        if ref.lut is None:
            raise DataError(folder, f"no labels.json to say which organ each prediction id is, and reference "
                                    f"{ref.dataset} ({ref.source}) has no label ids to go by")
        out[ref.case_id] = (ref.lut, f"reference {ref.dataset}'s label ids")
    return out


def score_predictions(refs: list[CaseRef], files: dict[str, Path], luts: dict, scheme: LabelScheme, *,
                      with_hd95: bool = True, recorder: CaseRecorder | None = None) -> list[dict]:
    """One record per case, as :func:`~fedgin.evaluation.scoring.evaluate_cases` gives, plus the
    prediction file (``recorder``: as there; it reads each case's image)."""
    organs = {o: i for o, i in scheme.label_ids.items() if i > 0}
    records = []
    for ref in tqdm(refs, desc="evaluate", unit="case", leave=False, disable=None):
        start = time.perf_counter()
        reference, affine = ref.read_label()  # the grids were checked from the headers up front
        path = files[ref.case_id]
        raw = read_raw_label(path, reference.shape, affine)
        lut, source = luts[ref.case_id]
        pred = map_label_ids(raw, lut, path, source)
        scores = case_metrics(pred, reference, organs, ref.annotated, spacing_of(affine), with_hd95=with_hd95)
        records.append({"case": ref.case_id, "dataset": ref.dataset, "modality": ref.modality,
                        "annotated": list(ref.annotated), "metrics": scores, "prediction_file": str(path),
                        "seconds": time.perf_counter() - start})
        if recorder is not None:
            image, _ = read_image(ref.image)
            records[-1]["statistics"] = recorder.add(ref.case_id, ref.dataset, ref.modality, image, affine,
                                                     pred, reference)
    return records


def evaluate_folder(pred: str, datasets: list[str], out: str, *, cases: str = "predicted", seed: int | None = None,
                    split_file: str | None = None, scheme: str | None = None,
                    label_map: Mapping[str, str] | None = None, qa: bool = False) -> dict:
    """Score the label maps in ``pred`` against the reference ``datasets``; writes ``out`` (see
    :func:`~fedgin.evaluation.scoring.write_evaluation`). ``cases``: one of :data:`PRED_CASES`;
    ``seed``/``split_file`` choose the test split (``cases="test"``). ``label_map``'s names must
    each label something in the references or the predictions. ``qa``: as for
    :func:`~fedgin.evaluation.scoring.evaluate`."""
    if cases not in PRED_CASES:
        raise FedginError(f"--cases must be one of {', '.join(PRED_CASES)}, got {cases!r}")
    folder = Path(pred)
    files = prediction_files(folder)
    provenance = read_provenance(folder)
    meta = provenance.get("model_meta") if isinstance(provenance.get("model_meta"), dict) else {}
    recorded_scheme = provenance.get("scheme", {}).get("name") if isinstance(provenance.get("scheme"), dict) else None
    label_scheme = get_scheme(scheme or recorded_scheme or DEFAULT_SCHEME)
    seed = int(meta.get("seed", 0)) if seed is None else seed
    split_file = meta.get("split") if split_file is None else split_file
    effective = merged_label_map(meta.get("label_map"), label_map)
    opened = [open_dataset(path, label_scheme, label_map=effective) for path in datasets]
    labels = prediction_labels(folder)
    names = [str(n) for n in labels[0]] if labels is not None else []
    for path in files.values():
        if is_seg_path(path):
            from ..data.dicom_seg import read_segments

            names += list(read_segments(path))
    check_label_map_names(label_map, opened, names)
    refs = _pick_cases(opened, files, folder, cases=cases, seed=seed, split_file=split_file)
    luts = _luts(refs, files, folder, label_scheme, effective, labels)
    _check_grids(refs, files)
    with CaseRecorder.for_evaluation(out, label_scheme, qa, cases=len(refs)) as recorder:
        records = score_predictions(refs, files, luts, label_scheme, recorder=recorder)
    args = {"pred": pred, "data": datasets, "cases": cases, "seed": seed, "split": split_file,
            "scheme": label_scheme.name, "label_map": effective,
            "labels_from": str(labels[1]) if labels is not None else "reference datasets", "postprocess": False}
    model = provenance.get("model")
    summary = write_evaluation(Path(out), records, label_scheme, args, model=str(model) if model else None,
                               model_meta=meta or None, predictions=str(folder))
    if qa:
        evaluation_page(Path(out), summary, label_scheme)
    return summary
