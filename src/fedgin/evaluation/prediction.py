"""``fedgin predict``: NIfTI in, uint8 label map out with exactly the input's shape and affine.

The label map is post-processed on the input's grid with the checkpoint's plan (keep each listed
organ's largest connected components) unless ``postprocess=False`` (``--no-postprocess``). It (and
each ``--masks`` file) carries the input's header: qform and sform codes and matrices, pixdim,
units, and descrip after ``fedgin label map;`` (:func:`fedgin.data.nifti.label_header`).

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
from pathlib import Path

import numpy as np

from ..atomic import publish, temp_path, write_text
from ..config import package_versions
from ..data.cache import file_digest
from ..data.datasets import _read_json, normalise_modality
from ..data.nifti import label_header, read_header, read_header_info, read_volume, write_volume
from ..data.preprocess import preprocess
from ..engine.checkpoint import load_checkpoint, normalisation_note
from ..engine.inference import predict_labels, predict_labels_and_probabilities
from ..engine.postprocess import body_side
from ..engine.trainer import resolve_device
from ..errors import DataError, FedginError
from .qa import CaseRecorder, prediction_page
from .statistics import statistics_path

NIFTI_ENDINGS = (".nii.gz", ".nii")


def case_name(path: Path) -> str:
    """``liver_01_0000.nii.gz`` -> ``liver_01`` (nnU-Net's channel suffix dropped)."""
    name = path.name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return name[:-5] if name.endswith("_0000") else name


def list_inputs(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(path, "input not found")
    if path.is_file():
        if not path.name.endswith(NIFTI_ENDINGS):
            raise DataError(path, "not a NIfTI file (-i takes a .nii or .nii.gz file or a folder of them)")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_ENDINGS))
    if not files:
        raise DataError(path, "no .nii or .nii.gz files in folder")
    seen: dict[str, Path] = {}
    for f in files:
        other = seen.setdefault(case_name(f), f)
        if other is not f:
            raise DataError(f, f"would write the same output {case_name(f)}.nii.gz as {other.name}")
    return files


def infer_modality(inputs: Path, sites: list[dict], explicit: str | None) -> str:
    """``--modality``, else the ``dataset.json`` above the input, else the checkpoint's sites if
    they were all one modality."""
    if explicit:
        return normalise_modality(explicit)
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
            log=print) -> list[Path]:
    """Predict every NIfTI of ``inputs`` (a file or a folder) into the folder ``out`` with
    ``model`` (a checkpoint file, or a run dir's ``checkpoint``: ``last`` by default, ``round_N``
    or ``epoch_N``); returns the files written (see the module docstring). ``compile``: the network
    through ``torch.compile`` (on a CPU it measured no faster; :mod:`fedgin.engine.compiled`).
    ``statistics``: ``{case}.statistics.json`` per case (:mod:`fedgin.evaluation.statistics`);
    ``qa``: ``qa.html`` and ``qa.npz`` (:mod:`fedgin.evaluation.qa`)."""
    check_output_folder(out)
    ckpt = load_checkpoint(model, checkpoint=checkpoint)
    note = normalisation_note(ckpt)
    if note:
        log(note)
    src = Path(inputs)
    files = list_inputs(src)
    mod = infer_modality(src, ckpt.sites, modality)
    for f in files:  # validate headers of every input before writing anything
        shape, _ = read_header_info(f)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
            raise DataError(f, f"expected a 3D volume, got shape {shape}")
    dev = resolve_device(device)
    net = ckpt.build(dev)
    dest, created = output_folder(out)
    # outputs are staged in a hidden folder and moved in only once every input has succeeded
    stage = Path(tempfile.mkdtemp(prefix=".fedgin-predict-", dir=dest))
    options = {"masks": masks, "postprocess": postprocess, "save_probabilities": save_probabilities,
               "compile": compile, "statistics": statistics, "qa": qa}
    recorder = CaseRecorder(stage, ckpt.scheme, views=qa, statistics_dir=stage if statistics else None)
    try:
        with recorder:
            staged = _predict_all(files, stage, net, ckpt, mod, dev, options, log, recorder)
        arguments = {"input": inputs, "output": out, "model": str(model), "checkpoint": checkpoint,
                     "modality": mod, "device": str(dev), **options, **({"normalisation": note} if note else {}),
                     "postprocess_plan": ckpt.postprocess.to_dict() if postprocess else None}
        _write_json(stage / "labels.json", ckpt.scheme.label_ids)
        provenance = _provenance(ckpt, files, arguments)
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


def _predict_all(files, dest, net, ckpt, mod, dev, options, log, recorder=None) -> list[Path]:
    written: list[Path] = []
    classes = sorted(ckpt.scheme.label_ids, key=ckpt.scheme.label_ids.get)
    for f in files:
        start = time.perf_counter()
        image, affine = read_volume(f, kind="image")
        source = read_header(f)
        pre = preprocess(image, affine, mod, ckpt.preprocess)
        body = body_side(image, affine, mod) if options["postprocess"] and ckpt.postprocess.sides else None
        if not (options["qa"] or options["statistics"]):
            del image  # the statistics and the QA page need it
        name = case_name(f)
        if options["save_probabilities"]:
            labels, probabilities = predict_labels_and_probabilities(net, pre, dev, compile=options["compile"])
            written.append(write_probabilities(dest / f"{name}.npz", probabilities, classes))
            del probabilities
        else:
            labels = predict_labels(net, pre, dev, compile=options["compile"])
        if options["postprocess"]:
            labels = ckpt.postprocess.apply(labels, ckpt.scheme, body)
        written.append(write_volume(dest / f"{name}.nii.gz", labels, affine, dtype=np.uint8,
                                    header=label_header(source)))
        if options["masks"]:
            for organ, idx in ckpt.scheme.label_ids.items():
                if idx:
                    written.append(write_volume(dest / f"{name}_{organ}.nii.gz", (labels == idx), affine,
                                                dtype=np.uint8, header=label_header(source, f"fedgin {organ} mask")))
        if options["qa"] or options["statistics"]:
            stats = recorder.add(name, None, mod, image, affine, labels)
            if options["statistics"]:
                written.append(statistics_path(dest, name))
            for warning in stats["warnings"]:
                log(f"{name}: plausibility warning: {warning}")
        log(f"{f.name} -> {name}.nii.gz ({time.perf_counter() - start:.1f}s)")
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


def _provenance(ckpt, files, arguments: dict) -> dict:
    return {
        "model": str(ckpt.path),
        "checkpoint": {"file": str(ckpt.path), "sha256": file_digest(Path(ckpt.path)),
                       **{k: ckpt.meta[k] for k in ("round", "epoch") if k in ckpt.meta}},
        "model_meta": ckpt.meta,
        "scheme": ckpt.scheme.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "architecture": ckpt.model_config.to_dict(),
        "arguments": arguments,
        "inputs": [str(f) for f in files],
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))
