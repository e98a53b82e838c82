"""On-disk cache of preprocessed cases, keyed by input content and settings.

The key hashes the bytes of every input file of a case, the label mapping, the label scheme, the
:class:`PreprocessConfig` and the source of the code that reads and preprocesses a case, so a
changed file, setting or preprocessing code never serves a stale entry.

An entry is a folder ``preprocessed/{case}-{key}/`` holding ``image.npy`` (``D x H x W`` float32),
``label.npy`` (uint8, when the case has a label) and ``meta.json`` (the geometry, which slices
show an organ, the labelled voxels outside the body box). Plain ``.npy`` files, so training reads
them a slice at a time (:class:`fedgin.data.npy.NpyVolume`) instead of holding a site in memory.
An entry is written in a temporary folder and renamed into place; a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..atomic import current_umask
from .datasets import CaseRef, read_image
from .labels import LabelScheme
from .npy import DamagedArray, NpyVolume
from .preprocess import Geometry, PreprocessConfig, Preprocessed, preprocess

CACHE_FORMAT = 2


def default_cache_dir() -> Path:
    """``$FEDGIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedgin``, else ``~/.cache/fedgin``."""
    env = os.environ.get("FEDGIN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedgin"


def file_digest(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - deliberate per-process memo
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def input_digest(path: Path) -> str:
    """:func:`file_digest` of a file; of a DICOM series folder, the SHA-256 over its files' digests."""
    if not path.is_dir():
        return file_digest(path)
    from .dicom import dicom_files

    return hashlib.sha256("".join(file_digest(p) for p in dicom_files(path)).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 over the source of the modules whose code decides an entry's content (reading,
    label mapping, preprocessing): editing any of them gives every case a new key."""
    from . import datasets, dicom, dicom_seg, labels, nifti
    from . import preprocess as preprocess_module

    digest = hashlib.sha256()
    for module in (datasets, nifti, dicom, dicom_seg, preprocess_module, labels):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def cache_key(case: CaseRef, scheme: LabelScheme, cfg: PreprocessConfig, *, image_only: bool = False) -> str:
    files = [case.image] + ([] if image_only else ([case.label] if case.label else []) + [m for m, _ in case.masks])
    payload = {
        # an image-only entry is what prediction sees: its plane is the body's, never widened by a label
        **({"image_only": True} if image_only else {}),
        "format": CACHE_FORMAT,
        "code": code_version(),
        "files": [input_digest(Path(f)) for f in files],
        "mask_ids": [i for _, i in case.masks],
        "lut": list(case.lut) if case.lut else None,
        "modality": case.modality,
        "scheme": scheme.to_dict(),
        "preprocess": cfg.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def organ_slices(label: np.ndarray) -> np.ndarray:
    """Per slice of a ``D x H x W`` label map: does it show an organ."""
    return (label.reshape(len(label), -1) > 0).any(axis=1)


def load_case(
    case: CaseRef,
    scheme: LabelScheme,
    cfg: PreprocessConfig,
    cache_dir: Path | None = None,
    *,
    use_cache: bool = True,
    in_memory: bool = True,
    image_only: bool = False,
) -> Preprocessed:
    """Read and preprocess ``case``, through the cache unless ``use_cache`` is False.

    From the cache, ``in_memory=False`` gives ``image`` and ``label`` as :class:`NpyVolume` (read
    slice by slice from the entry) instead of arrays. ``image_only``: the image alone, preprocessed
    exactly as ``fedgin predict`` does (no label, so the plane is the body's box, never widened to
    labelled voxels outside it); what validation and ``fedgin evaluate --model`` score."""
    def compute() -> Preprocessed:
        if image_only:
            image, affine = read_image(case.image)
            return preprocess(image, affine, case.modality, cfg)
        image, label, affine = case.read(scheme)
        return preprocess(image, affine, case.modality, cfg, label)

    if not use_cache:
        return compute()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    kind = "-image" if image_only else ""
    folder = root / "preprocessed" / f"{case.case_id}{kind}-{cache_key(case, scheme, cfg, image_only=image_only)}"
    entry = _open_entry(folder)
    if entry is None:
        _write_entry(folder, compute())
        entry = _open_entry(folder)
        if entry is None:
            raise OSError(f"{folder}: the cache entry just written cannot be read back")
    if in_memory:
        entry.image = np.asarray(entry.image)
        entry.label = np.asarray(entry.label) if entry.label is not None else None
    return entry


def _open_entry(folder: Path) -> Preprocessed | None:
    """The entry in ``folder`` with its arrays on disk, or None (missing, or damaged: removed)."""
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        image = NpyVolume.open(folder / "image.npy")
        label = NpyVolume.open(folder / "label.npy") if meta["has_label"] else None
        if label is not None and label.shape != image.shape:
            raise DamagedArray("image and label shapes differ")
        organs = np.array(meta["organ_slices"], dtype=bool) if label is not None else None
        if organs is not None and organs.shape != (len(image),):
            raise DamagedArray("organ_slices does not cover the slices")
        return Preprocessed(image=image, label=label, geometry=Geometry.from_dict(meta["geometry"]),
                            labels_outside_body=int(meta["labels_outside_body"]), organ_slices=organs)
    except (OSError, ValueError, KeyError, TypeError, DamagedArray):
        shutil.rmtree(folder, ignore_errors=True)  # recomputed by the caller
        return None


def _write_entry(folder: Path, pre: Preprocessed) -> None:
    """Write ``pre`` as the entry ``folder``: in a temporary folder beside it, then one rename (a
    reader never sees a half-written entry; of two writers of one entry, the first rename wins)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        np.save(tmp / "image.npy", np.ascontiguousarray(pre.image, dtype=np.float32))
        meta = {"format": CACHE_FORMAT, "geometry": pre.geometry.to_dict(), "has_label": pre.label is not None,
                "labels_outside_body": pre.labels_outside_body,
                "organ_slices": organ_slices(pre.label).tolist() if pre.label is not None else None}
        if pre.label is not None:
            np.save(tmp / "label.npy", np.ascontiguousarray(pre.label, dtype=np.uint8))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not another writer's entry: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _entries(root: Path) -> list[Path]:
    """The cache's entries and the temporaries an interrupted write left behind (folders, and the
    files of format 1)."""
    folder = root / "preprocessed"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def cache_info(cache_dir: Path | None = None) -> dict:
    """Where the cache is, how many entries it holds and how many bytes they take."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    found = _entries(root)
    return {"path": str(root), "entries": sum(1 for p in found if not p.name.startswith(".tmp-")),
            "bytes": sum(_size(p) for p in found)}


def clear_cache(cache_dir: Path | None = None) -> dict:
    """Delete every preprocessed entry (and leftover temporaries); nothing else in ``cache_dir``.
    Returns what was removed, as :func:`cache_info` counts it."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    removed = cache_info(root)
    for path in _entries(root):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


def describe_cache(info: dict) -> str:
    """``fedgin cache info``'s line for a :func:`cache_info` result: where, how many entries, MiB."""
    return f"{info['path']}: {info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB"


def describe_cleared(removed: dict) -> str:
    """``fedgin cache clear``'s line for a :func:`clear_cache` result."""
    return f"removed {removed['entries']} entries ({removed['bytes'] / 2**20:.1f} MiB) from {removed['path']}"
