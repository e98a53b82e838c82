"""Shared bits of the benchmark scripts: provenance (command, date, machine) and result files.

A script imports it after putting this folder on ``sys.path`` (so that it also works under
``runpy`` or from another working directory)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import ...  # noqa: E402
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def command_line(argv: list[str] | None = None, script: str | Path | None = None) -> str:
    """The command that ran this benchmark, relative to the repository root.

    By default ``sys.argv``; ``script`` (the benchmark's ``__file__``) and ``argv`` (the arguments
    given to ``main(argv)``) name the command when ``main`` is called from Python.
    """
    script = sys.argv[0] if script is None else script
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", os.path.relpath(script, ROOT)] + args)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine_info(threads: int | None = None) -> dict:
    """Platform, CPU, torch and load; ``threads`` defaults to ``torch.get_num_threads()`` (give it
    when the timed work runs in child processes with their own thread count)."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def provenance(threads: int | None = None) -> dict:
    """The first keys of a result: ``command``, ``date`` and ``machine``."""
    return {"command": command_line(), "date": now_iso(), "machine": machine_info(threads)}


def write_result(where: str | Path, result: dict) -> Path:
    """Write ``result`` as indented JSON and print it; ``where`` is a path (a script's ``--out``)
    or a bare name for ``docs/results/<name>.json``."""
    path = where if isinstance(where, Path) else RESULTS / f"{where}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def write_text(path: Path, text: str) -> Path:
    """Write a text report (a results ``.md``) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    return path
