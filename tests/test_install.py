"""A built wheel, installed outside the checkout, works: the package data (the shipped split
files) is inside it, and ``fedgin data check``, ``train`` (without ``--split``) and ``evaluate``
run from the installed copy, not from ``src/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_a_built_wheel_installed_elsewhere_checks_trains_and_evaluates(tmp_path, phantom_datasets):
    # built from a copy of the sources, so no build/ or egg-info of the checkout leaks in, and the
    # checkout gets none
    source = tmp_path / "source"
    shutil.copytree(REPO / "src" / "fedgin", source / "src" / "fedgin", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, timeout=600,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = wheels.glob("fedgin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "src" / "fedgin" / "splits").glob("*.json"))
    assert shipped and all(f"fedgin/splits/{name}" in names for name in shipped), names
    assert "fedgin/py.typed" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # the installed copy comes first on the path; the checkout's src/ is not on it at all
    path = [str(site)] + [p for p in sys.path if p and Path(p).resolve() != (REPO / "src").resolve()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONNOUSERSITE": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    # -S: no site processing, so the editable install's .pth (pointing at src/) is not read;
    # PYTHONPATH still is
    where = _run(["-S", "-c", "import fedgin; print(fedgin.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(site), where

    ct, _ = phantom_datasets(4, 4)
    fedgin = ["-S", "-c", "import sys; from fedgin.cli import main; sys.argv[0] = 'fedgin'; sys.exit(main())"]
    _run([*fedgin, "data", "check", str(ct)], work, env)
    _run([*fedgin, "train", "--mode", "local", "--site", f"ct={ct}", "--out", "run", "--epochs", "1",
          "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1", "--cache-dir", "cache"], work, env)
    _run([*fedgin, "evaluate", "--model", "run/ct", "--data", str(ct), "--out", "eval", "--cache-dir", "cache"],
         work, env)
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert summary["by_modality"]["CT"]["cases"] >= 1


def test_pyproject_gives_ranges_and_the_lock_pins_every_dependency():
    """``pyproject.toml`` names compatible ranges (Flower exact: its API changes every release);
    ``requirements.lock``, which ``make`` installs with, pins every one of them exactly."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    lock = {name.lower(): version for name, version in lock.items()}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        assert name in lock, f"{name} is not pinned in requirements.lock"
        if name == "flwr":
            # dp: Flower's privacy accountant (dp-accounting), which --dp-noise reports epsilon with
            assert requirement == f"flwr[simulation,dp]=={lock['flwr']}" == "flwr[simulation,dp]==1.42.0"
            assert "dp-accounting" in lock
        else:
            assert "==" not in requirement, f"{requirement}: give a compatible range; the exact pin is in the lock"
