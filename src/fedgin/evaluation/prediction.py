"""``fedgin predict``: NIfTI or DICOM in, uint8 label map out with exactly the input's shape and affine.

``-i`` is a NIfTI file, a folder of them, a DICOM series folder or a folder of series folders (one
case per series, named after its folder; :mod:`fedgin.data.dicom`). Both kinds of input go through
the same preprocessing, prediction and post-processing, so one scan as DICOM or as NIfTI gives one
label map. ``output_types`` (``--output-type``): ``nifti`` writes ``{case}.nii.gz``; ``dicom-seg``
(DICOM input only) writes ``{case}.seg.dcm``, a DICOM SEG referencing the series
(:mod:`fedgin.data.dicom_seg`); both may be asked for.

The label map is post-processed on the input's grid with the checkpoint's plan (keep each listed
organ's largest connected components) unless ``postprocess=False`` (``--no-postprocess``). It (and
each ``--masks`` file) carries the input's header: qform and sform codes and matrices, pixdim,
units, and descrip after ``fedgin label map;`` (:func:`fedgin.data.nifti.label_header`); from DICOM
input, qform and sform both carry the series' affine (code 1, scanner).

``save_probabilities=True`` (``--save-probabilities``) also writes ``{case}.npz`` (compressed):
``probabilities``, the softmax ``C x X x Y x Z`` float16 on the input's voxel grid, the spatial axes
in the same order as the NIfTI data array (nnU-Net's npz holds ``C x Z x Y x X``, SimpleITK's
order), before post-processing, so its argmax over ``C`` is the label map before post-processing;
and ``labels``, the class names in channel order (``labels[c]`` is label id ``c``).

Every output is written to a temporary name and renamed, and all inputs are validated before the
first output is written, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import publish, temp_path, write_text
from ..config import package_versions
from ..data.body import body_side
from ..data.cache import file_digest
from ..data.datasets import _read_json, normalise_modality
from ..data.dicom import DicomSeries, find_series, holds_dicom, is_dicom_file
from ..data.nifti import label_header, read_header, read_header_info, read_volume, write_volume
from ..data.preprocess import preprocess
from ..engine.checkpoint import load_checkpoint, normalisation_note
from ..engine.inference import predict_labels, predict_labels_and_probabilities
from ..engine.trainer import resolve_device
from ..errors import DataError, FedginError
from .qa import CaseRecorder, prediction_page
from .statistics import statistics_path

NIFTI_ENDINGS = (".nii.gz", ".nii")
#: ``--output-type`` values.
OUTPUT_TYPES = ("nifti", "dicom-seg")
SEG_ENDING = ".seg.dcm"


@dataclass
class CaseInput:
    """One case to predict: a NIfTI file, or a DICOM series (``series``; ``path`` is its folder)."""

    name: str
    path: Path
    series: DicomSeries | None = None

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The image (float32, HU for CT) and its voxel-to-RAS affine."""
        if self.series is not None:
            return self.series.read(), self.series.affine
        return read_volume(self.path, kind="image")

    def header(self):
        """The NIfTI header the label map takes over (None for DICOM: a plain scanner-space header)."""
        return None if self.series is not None else read_header(self.path)

    def check(self) -> None:
        """Validate what can be checked before any output (a NIfTI's header; a series was checked
        when it was opened)."""
        if self.series is None:
            shape, _ = read_header_info(self.path)
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
                raise DataError(self.path, f"expected a 3D volume, got shape {shape}")

    def describe(self) -> str:
        return f"{self.path.name} (series {self.series.uid})" if self.series is not None else self.path.name

    def record(self) -> str:
        """What ``provenance.json`` lists as the input."""
        return str(self.path)


def case_name(path: Path) -> str:
    """``liver_01_0000.nii.gz`` -> ``liver_01`` (nnU-Net's channel suffix dropped)."""
    name = path.name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return name[:-5] if name.endswith("_0000") else name


def list_inputs(path: Path, series: list[str] | None = None) -> list[CaseInput]:
    """The cases of ``-i``: a NIfTI file, a folder of NIfTI files, or DICOM (see the module
    docstring; ``series``: the ``--series`` UIDs to keep)."""
    if not path.exists():
        raise DataError(path, "input not found")
    if path.is_file():
        if is_dicom_file(path):
            raise DataError(path, "a DICOM file is one slice: -i takes the folder of its series")
        if not path.name.endswith(NIFTI_ENDINGS):
            raise DataError(path, "not a NIfTI file (-i takes a .nii or .nii.gz file, a folder of them, "
                                  "or a DICOM series folder)")
        if series:
            raise FedginError("--series chooses a DICOM series; the input is a NIfTI file")
        return [CaseInput(case_name(path), path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_ENDINGS))
    if not files:
        if not holds_dicom(path):
            raise DataError(path, "no .nii or .nii.gz files and no DICOM files in folder")
        return [CaseInput(name, s.folder, s) for name, s in find_series(path, series)]
    if series:
        raise FedginError(f"--series chooses a DICOM series; {path} holds NIfTI files")
    seen: dict[str, Path] = {}
    for f in files:
        other = seen.setdefault(case_name(f), f)
        if other is not f:
            raise DataError(f, f"would write the same output {case_name(f)}.nii.gz as {other.name}")
    return [CaseInput(case_name(f), f) for f in files]


def parse_output_types(values: list[str] | None) -> tuple[str, ...]:
    """``--output-type`` (repeatable, each a comma list) as a tuple in :data:`OUTPUT_TYPES` order;
    default ``("nifti",)``."""
    chosen = {t.strip().lower() for v in (values or ["nifti"]) for t in str(v).split(",") if t.strip()}
    unknown = sorted(chosen - set(OUTPUT_TYPES))
    if unknown or not chosen:
        raise FedginError(f"--output-type takes {' or '.join(OUTPUT_TYPES)} (or both, comma-separated), "
                          f"got {', '.join(unknown) or 'nothing'}")
    return tuple(t for t in OUTPUT_TYPES if t in chosen)


def infer_modality(inputs: Path, sites: list[dict], explicit: str | None,
                   cases: list[CaseInput] | None = None) -> str:
    """``--modality``, else the DICOM series' Modality tag, else the ``dataset.json`` above the
    input, else the checkpoint's sites if they were all one modality. ``--modality`` must agree
    with the Modality tag of a DICOM series."""
    tagged = {c.series.modality for c in cases or () if c.series is not None}
    if explicit:
        chosen = normalise_modality(explicit)
        for case in cases or ():
            if case.series is not None and case.series.modality != chosen:
                raise DataError(case.path, f"series {case.series.uid} is {case.series.modality} by its Modality "
                                           f"tag, not {chosen} (--modality)")
        return chosen
    if len(tagged) > 1:
        raise FedginError(f"{inputs}: the series mix CT and MR; predict each modality on its own")
    if tagged:
        return tagged.pop()
    folder = inputs if inputs.is_dir() else inputs.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.exists():
            meta = _read_json(candidate)
            channel = meta.get("channel_names", {}).get("0")
            if channel is not None:
                return normalise_modality(channel, where=candidate)
    modalities = {s.get("modality") for s in sites}
    if len(modalities) == 1 and None not in modalities:
        return modalities.pop()
    raise FedginError("cannot tell the input modality: pass --modality CT or --modality MRI")


def check_output_folder(out: str | Path) -> Path:
    """``-o``: a folder, or a path to create one at (not an existing file)."""
    dest = Path(out)
    if dest.exists() and not dest.is_dir():
        raise DataError(dest, "exists and is not a folder (-o takes an output folder)")
    return dest


def output_folder(out: str | Path) -> tuple[Path, bool]:
    """The ``-o`` folder, created if needed: ``(folder, whether it was created)``; a path below a
    file is refused."""
    dest = check_output_folder(out)
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(dest, f"cannot create the output folder ({exc.strerror or exc})") from None
    return dest, created


def predict(inputs: str, out: str, model: str, *, modality: str | None = None, masks: bool = False,
            device: str = "auto", postprocess: bool = True, checkpoint: str | None = None,
            save_probabilities: bool = False, compile: bool = False, statistics: bool = False, qa: bool = False,
            series: list[str] | None = None, output_types: tuple[str, ...] = ("nifti",), log=print) -> list[Path]:
    """Predict every case of ``inputs`` (a NIfTI file or folder, a DICOM series folder or a folder
    of them) into the folder ``out`` with ``model`` (a checkpoint file, or a run dir's
    ``checkpoint``: ``last`` by default, ``round_N`` or ``epoch_N``); returns the files written
    (see the module docstring). ``series``: the SeriesInstanceUIDs to predict (``--series``);
    ``output_types``: from :data:`OUTPUT_TYPES`. ``compile``: the network through
    ``torch.compile`` (on a CPU it measured no faster; :mod:`fedgin.engine.compiled`).
    ``statistics``: ``{case}.statistics.json`` per case (:mod:`fedgin.evaluation.statistics`);
    ``qa``: ``qa.html`` and ``qa.npz`` (:mod:`fedgin.evaluation.qa`)."""
    check_output_folder(out)
    output_types = parse_output_types(list(output_types))
    ckpt = load_checkpoint(model, checkpoint=checkpoint)
    note = normalisation_note(ckpt)
    if note:
        log(note)
    src = Path(inputs)
    cases = list_inputs(src, series)
    if "dicom-seg" in output_types:
        nifti = [c for c in cases if c.series is None]
        if nifti:
            raise DataError(nifti[0].path, "--output-type dicom-seg needs DICOM input: a DICOM SEG references "
                                           "the series' instances, which a NIfTI file does not have")
    mod = infer_modality(src, ckpt.sites, modality, cases)
    for case in cases:  # validate every input before writing anything
        case.check()
    if "dicom-seg" in output_types:
        from ..data.dicom_seg import check_seg_support

        check_seg_support()
    dev = resolve_device(device)
    net = ckpt.build(dev)
    dest, created = output_folder(out)
    # outputs are staged in a hidden folder and moved in only once every input has succeeded
    stage = Path(tempfile.mkdtemp(prefix=".fedgin-predict-", dir=dest))
    options = {"masks": masks, "postprocess": postprocess, "save_probabilities": save_probabilities,
               "compile": compile, "statistics": statistics, "qa": qa, "output_types": list(output_types)}
    recorder = CaseRecorder(stage, ckpt.scheme, views=qa, statistics_dir=stage if statistics else None,
                            cases=len(cases))
    try:
        with recorder:
            staged = _predict_all(cases, stage, net, ckpt, mod, dev, options, log, recorder)
        arguments = {"input": inputs, "output": out, "model": str(model), "checkpoint": checkpoint,
                     "modality": mod, "device": str(dev), "series": list(series) if series else None, **options,
                     **({"normalisation": note} if note else {}),
                     "postprocess_plan": ckpt.postprocess.to_dict() if postprocess else None}
        _write_json(stage / "labels.json", ckpt.scheme.label_ids)
        provenance = _provenance(ckpt, cases, arguments)
        _write_json(stage / "provenance.json", provenance)
        if qa:
            staged += [stage / "qa.npz", prediction_page(stage, provenance, ckpt.scheme)]
        written = []
        for path in staged + [stage / "labels.json", stage / "provenance.json"]:
            os.replace(path, dest / path.name)
            written.append(dest / path.name)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return written


def compact_ct(image: np.ndarray, slab: int = 32) -> np.ndarray:
    """A CT kept for the statistics and the QA page after preprocessing: HU rounded to int16 (half
    of float32's memory; a clinical 512 x 512 x 600 CT then predicts within 2.5 GB with the QA page
    on), converted a slab of the last axis at a time."""
    out = np.empty(image.shape, np.int16)
    for z0 in range(0, image.shape[2], slab):
        out[:, :, z0:z0 + slab] = np.clip(np.rint(image[:, :, z0:z0 + slab]), -32768, 32767)
    return out


def _predict_all(cases: list[CaseInput], dest, net, ckpt, mod, dev, options, log, recorder=None) -> list[Path]:
    written: list[Path] = []
    classes = sorted(ckpt.scheme.label_ids, key=ckpt.scheme.label_ids.get)
    digest = file_digest(Path(ckpt.path)) if "dicom-seg" in options["output_types"] else None
    for case in cases:
        start = time.perf_counter()
        image, affine = case.read()
        source = case.header()
        pre = preprocess(image, affine, mod, ckpt.preprocess)
        body = body_side(image, affine, mod) if options["postprocess"] and ckpt.postprocess.sides else None
        if options["qa"] or options["statistics"]:
            image = compact_ct(image) if mod == "CT" else image  # what they need of it, in less memory
        else:
            del image
        name = case.name
        if options["save_probabilities"]:
            labels, probabilities = predict_labels_and_probabilities(net, pre, dev, compile=options["compile"])
            written.append(write_probabilities(dest / f"{name}.npz", probabilities, classes))
            del probabilities
        else:
            labels = predict_labels(net, pre, dev, compile=options["compile"])
        del pre
        if options["postprocess"]:
            labels = ckpt.postprocess.apply(labels, ckpt.scheme, body)
        outputs = []
        if "nifti" in options["output_types"]:
            written.append(write_volume(dest / f"{name}.nii.gz", labels, affine, dtype=np.uint8,
                                        header=None if source is None else label_header(source)))
            outputs.append(f"{name}.nii.gz")
        if "dicom-seg" in options["output_types"]:
            from ..data.dicom_seg import write_seg

            written.append(write_seg(dest / f"{name}{SEG_ENDING}", labels, case.series, ckpt.scheme,
                                     model_digest=digest, model_name=Path(ckpt.path).name))
            outputs.append(f"{name}{SEG_ENDING}")
        if options["masks"]:
            for organ, idx in ckpt.scheme.label_ids.items():
                if idx:
                    header = None if source is None else label_header(source, f"fedgin {organ} mask")
                    written.append(write_volume(dest / f"{name}_{organ}.nii.gz", (labels == idx), affine,
                                                dtype=np.uint8, header=header))
        if options["qa"] or options["statistics"]:
            stats = recorder.add(name, None, mod, image, affine, labels)
            if options["statistics"]:
                written.append(statistics_path(dest, name))
            for warning in stats["warnings"]:
                log(f"{name}: plausibility warning: {warning}")
        if case.series is not None and case.series.localizers_left_out:
            log(f"{name}: {case.series.localizers_left_out} localizer image(s) of the series left out")
        log(f"{case.describe()} -> {', '.join(outputs) or name} ({time.perf_counter() - start:.1f}s)")
    return written


def write_probabilities(path: Path, probabilities: np.ndarray, classes: list[str]) -> Path:
    """``{case}.npz`` atomically: ``probabilities`` (``C x X x Y x Z`` float16) and ``labels``
    (the ``C`` class names, a plain string array: ``np.load`` needs no pickle)."""
    tmp = temp_path(path, ".npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, probabilities=probabilities, labels=np.array(classes, dtype=str))
        return publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _provenance(ckpt, cases: list[CaseInput], arguments: dict) -> dict:
    series = [{"case": c.name, "folder": str(c.path), "series_instance_uid": c.series.uid,
               "slices": len(c.series.files)} for c in cases if c.series is not None]
    return {
        "model": str(ckpt.path),
        "checkpoint": {"file": str(ckpt.path), "sha256": file_digest(Path(ckpt.path)),
                       **{k: ckpt.meta[k] for k in ("round", "epoch") if k in ckpt.meta}},
        "model_meta": ckpt.meta,
        "scheme": ckpt.scheme.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "architecture": ckpt.model_config.to_dict(),
        "arguments": arguments,
        "inputs": [c.record() for c in cases],
        **({"dicom_series": series} if series else {}),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))
