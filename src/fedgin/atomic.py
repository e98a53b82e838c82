"""Atomic file writes: a temporary file in the target folder, then a rename, so a reader (or a
crash) never sees half a file. Files get the usual permissions (0666 less the umask), not the
0600 that temporary files are created with."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def temp_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary path beside ``target`` (same filesystem, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, target: Path) -> Path:
    """Give ``tmp`` ordinary permissions and move it onto ``target`` atomically."""
    os.chmod(tmp, _file_mode())
    os.replace(tmp, target)
    return target


def write_bytes(target: str | Path, data: bytes) -> Path:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target)
    try:
        tmp.write_bytes(data)
        return publish(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode())
