"""``fedgin predict``: NIfTI in, uint8 label map out with exactly the input's shape and affine.

The label map is post-processed on the input's grid with the checkpoint's plan (keep each listed
organ's largest connected components) unless ``postprocess=False`` (``--no-postprocess``).

Every output is written to a temporary name and renamed, and all inputs are validated before the
first output is written, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import shutil

import numpy as np

from ..atomic import write_text
from ..config import package_versions
from ..data.datasets import _read_json, normalise_modality
from ..data.nifti import read_header_info, read_volume, write_volume
from ..data.preprocess import preprocess
from ..engine.checkpoint import load_checkpoint
from ..engine.inference import predict_labels
from ..engine.trainer import resolve_device
from ..errors import DataError, FedginError

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


def predict(inputs: str, out: str, model: str, *, modality: str | None = None, masks: bool = False,
            device: str = "auto", postprocess: bool = True, log=print) -> list[Path]:
    ckpt = load_checkpoint(model)
    src = Path(inputs)
    files = list_inputs(src)
    mod = infer_modality(src, ckpt.sites, modality)
    for f in files:  # validate headers of every input before writing anything
        shape, _ = read_header_info(f)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
            raise DataError(f, f"expected a 3D volume, got shape {shape}")
    dev = resolve_device(device)
    net = ckpt.build(dev)
    dest = Path(out)
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    # outputs are staged in a hidden folder and moved in only once every input has succeeded
    stage = Path(tempfile.mkdtemp(prefix=".fedgin-predict-", dir=dest))
    try:
        staged = _predict_all(files, stage, net, ckpt, mod, dev, masks, postprocess, log)
        _write_json(stage / "labels.json", ckpt.scheme.label_ids)
        _write_json(stage / "provenance.json", _provenance(ckpt, files, inputs, out, mod, masks, dev, postprocess))
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


def _predict_all(files, dest, net, ckpt, mod, dev, masks, postprocess, log) -> list[Path]:
    written: list[Path] = []
    for f in files:
        start = time.perf_counter()
        image, affine = read_volume(f, kind="image")
        pre = preprocess(image, affine, mod, ckpt.preprocess)
        labels = predict_labels(net, pre, dev)
        if postprocess:
            labels = ckpt.postprocess.apply(labels, ckpt.scheme)
        name = case_name(f)
        written.append(write_volume(dest / f"{name}.nii.gz", labels, affine, dtype=np.uint8))
        if masks:
            for organ, idx in ckpt.scheme.label_ids.items():
                if idx:
                    written.append(write_volume(dest / f"{name}_{organ}.nii.gz", (labels == idx), affine,
                                                dtype=np.uint8))
        log(f"{f.name} -> {name}.nii.gz ({time.perf_counter() - start:.1f}s)")
    return written


def _provenance(ckpt, files, inputs, out, mod, masks, dev, postprocess) -> dict:
    return {
        "model": str(ckpt.path),
        "model_meta": ckpt.meta,
        "scheme": ckpt.scheme.to_dict(),
        "preprocess": ckpt.preprocess.to_dict(),
        "architecture": ckpt.model_config.to_dict(),
        "arguments": {"input": inputs, "output": out, "modality": mod, "masks": masks, "device": str(dev),
                      "postprocess": postprocess,
                      "postprocess_plan": ckpt.postprocess.to_dict() if postprocess else None},
        "inputs": [str(f) for f in files],
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2))
