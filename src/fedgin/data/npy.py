"""Read-only ``.npy`` volumes on disk, read a slice (or a run of slices) at a time.

:class:`NpyVolume` stands in for a ``D x H x W`` array in the code that walks a case slice by
slice (training batches, validation, prediction): ``volume[z]`` and ``volume[a:b]`` read just those
slices with one positioned read (``os.pread``), ``np.asarray(volume)`` reads it all. Reads are
explicit rather than a memory map on purpose: the pages of a map count in the process's resident
set for as long as the kernel keeps them, so a training run touching every slice of a large site
would look (and, under memory pressure, behave) as if it held the whole site; pages read with
``pread`` stay in the kernel's page cache, shared and reclaimable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DamagedArray(ValueError):
    """A ``.npy`` file whose header or size does not describe a C-ordered array."""


@dataclass(frozen=True, eq=False)
class NpyVolume:
    """A C-ordered ``.npy`` array of ndim >= 1 on disk; indexing along axis 0 reads from the file.

    It is not an array: arithmetic and comparisons need ``np.asarray(volume)`` (or a slice) first,
    and ``==`` says so rather than comparing silently."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # where the data start (after the header)

    @classmethod
    def open(cls, path: str | Path) -> "NpyVolume":
        """The array at ``path``, its header checked against the file's size."""
        path = str(path)
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                offset = fh.tell()
                size = os.fstat(fh.fileno()).st_size
        except (OSError, ValueError) as exc:
            raise DamagedArray(f"{path}: {exc}") from exc
        if fortran or dtype.hasobject or not shape:
            raise DamagedArray(f"{path}: not a plain C-ordered array")
        if size != offset + int(np.prod(shape)) * dtype.itemsize:
            raise DamagedArray(f"{path}: {size} bytes, the header describes {offset} + {shape} x {dtype}")
        return cls(path, tuple(int(s) for s in shape), dtype, offset)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def _slice_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start:stop`` (clipped to the array) as a new array."""
        start, stop = max(0, start), min(self.shape[0], stop)
        count = max(0, stop - start)
        out = np.empty((count, *self.shape[1:]), dtype=self.dtype)
        if count:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
                position = self.offset + start * self._slice_bytes
                while done < out.nbytes:  # pread may return fewer bytes than asked
                    n = os.preadv(fd, [view[done:]], position + done)
                    if n <= 0:
                        raise DamagedArray(f"{self.path}: ended early")
                    done += n
            finally:
                os.close(fd)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            z = int(key) + (self.shape[0] if key < 0 else 0)
            if not 0 <= z < self.shape[0]:
                raise IndexError(f"slice {key} of {self.shape[0]}")
            return self.read(z, z + 1)[0]
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.read(start, stop)
        return np.asarray(self)[key]

    def __eq__(self, other):
        raise TypeError("an NpyVolume is on disk: compare np.asarray(volume) or a slice of it")

    __hash__ = object.__hash__

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype, copy=False)
