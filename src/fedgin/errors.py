"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class FedginError(Exception):
    """A usage or data problem: reported as one line, exit code 2, no traceback."""

    exit_code = 2


class DataError(FedginError):
    """A dataset, volume or label problem tied to one file."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ModelError(FedginError):
    """A checkpoint or run directory that cannot be used."""
