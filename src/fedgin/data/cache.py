"""On-disk cache of preprocessed cases, keyed by input content and settings.

The key hashes the bytes of every input file of a case, the label mapping, the label scheme, the
:class:`PreprocessConfig` and the source of the code that reads and preprocesses a case, so a
changed file, setting or preprocessing code never serves a stale entry. Entries are
written atomically (temporary name, then rename); a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..atomic import publish, temp_path
from .datasets import CaseRef
from .labels import LabelScheme
from .preprocess import Geometry, PreprocessConfig, Preprocessed, preprocess

CACHE_FORMAT = 1


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


@lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 over the source of the modules whose code decides an entry's content (reading,
    label mapping, preprocessing): editing any of them gives every case a new key."""
    from . import datasets, labels, nifti
    from . import preprocess as preprocess_module

    digest = hashlib.sha256()
    for module in (datasets, nifti, preprocess_module, labels):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def cache_key(case: CaseRef, scheme: LabelScheme, cfg: PreprocessConfig) -> str:
    files = [case.image] + ([case.label] if case.label else []) + [m for m, _ in case.masks]
    payload = {
        "format": CACHE_FORMAT,
        "code": code_version(),
        "files": [file_digest(Path(f)) for f in files],
        "mask_ids": [i for _, i in case.masks],
        "lut": list(case.lut) if case.lut else None,
        "modality": case.modality,
        "scheme": scheme.to_dict(),
        "preprocess": cfg.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_case(
    case: CaseRef,
    scheme: LabelScheme,
    cfg: PreprocessConfig,
    cache_dir: Path | None = None,
    *,
    use_cache: bool = True,
) -> Preprocessed:
    """Read and preprocess ``case``, through the cache unless ``use_cache`` is False."""
    if not use_cache:
        image, label, affine = case.read(scheme)
        return preprocess(image, affine, case.modality, cfg, label)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "preprocessed" / f"{case.case_id}-{cache_key(case, scheme, cfg)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                geometry = Geometry.from_dict(json.loads(str(data["geometry"])))
                label = data["label"] if data["has_label"] else None
                return Preprocessed(image=data["image"], label=label, geometry=geometry)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile):  # EOFError: empty file
            path.unlink(missing_ok=True)  # damaged entry: recompute below
    image, label, affine = case.read(scheme)
    result = preprocess(image, affine, case.modality, cfg, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, ".npz")
    try:
        np.savez(
            tmp,
            image=result.image,
            label=result.label if result.label is not None else np.zeros(0, np.uint8),
            has_label=np.array(result.label is not None),
            geometry=np.array(json.dumps(result.geometry.to_dict())),
        )
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _entries(root: Path) -> list[Path]:
    """The cache's files: entries and temporaries an interrupted write left behind."""
    folder = root / "preprocessed"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def cache_info(cache_dir: Path | None = None) -> dict:
    """Where the cache is, how many entries it holds and how many bytes they take."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    files = _entries(root)
    return {"path": str(root), "entries": sum(1 for p in files if not p.name.startswith(".tmp-")),
            "bytes": sum(p.stat().st_size for p in files)}


def clear_cache(cache_dir: Path | None = None) -> dict:
    """Delete every preprocessed entry (and leftover temporaries); nothing else in ``cache_dir``.
    Returns what was removed, as :func:`cache_info` counts it."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    removed = cache_info(root)
    for path in _entries(root):
        path.unlink(missing_ok=True)
    return removed


def describe_cache(info: dict) -> str:
    """``fedgin cache info``'s line for a :func:`cache_info` result: where, how many entries, MiB."""
    return f"{info['path']}: {info['entries']} entries, {info['bytes'] / 2**20:.1f} MiB"


def describe_cleared(removed: dict) -> str:
    """``fedgin cache clear``'s line for a :func:`clear_cache` result."""
    return f"removed {removed['entries']} entries ({removed['bytes'] / 2**20:.1f} MiB) from {removed['path']}"
