"""What a user sees by default: fedgin's lines, no third-party chatter (``--debug`` shows it), the
post-processing plan in words, ``fedgin --version``, and a package whose licence is an SPDX string."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

import fedgin
from fedgin.cli import main
from fedgin.console import DEBUG_ENV, ignoring
from fedgin.engine.metrics import hd95_mm
from fedgin.engine.postprocess import PostprocessPlan
from fedgin.federated.launcher import FLOWER_LOG_LEVEL_ENV, worker_environment

REPO = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert capsys.readouterr().out == f"fedgin {pyproject['project']['version']}\n"
    assert fedgin.__version__ == pyproject["project"]["version"]


def test_the_licence_is_an_spdx_expression_with_its_file_and_builds_without_deprecation(tmp_path):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    # the metadata as setuptools builds it for `make`'s install, with every warning shown
    (tmp_path / "out").mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / "src" / "fedgin").mkdir(parents=True)
    (tmp_path / "src" / "fedgin" / "__init__.py").write_text('__version__ = "0"\n')
    done = subprocess.run([sys.executable, "-W", "always", "-c",
                           "from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel('out')"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Deprecat" not in done.stdout + done.stderr, done.stderr[-2000:]
    (metadata,) = (tmp_path / "out").glob("*.dist-info/METADATA")
    lines = metadata.read_text().splitlines()
    assert "License-Expression: Apache-2.0" in lines and "License-File: LICENSE" in lines


def test_the_post_processing_plan_reads_as_words():
    plan = PostprocessPlan({"liver": 1, "kidneys": 2})
    assert plan.describe() == ("liver: keep the largest connected component; kidneys: keep the 2 largest "
                               "connected components; every other organ as predicted")
    assert str(plan) == plan.describe() and f"{plan}" == plan.describe()
    assert str(PostprocessPlan()) == "none: every organ as predicted"
    assert repr(plan) == "PostprocessPlan(liver=1, kidneys=2)"  # the repr stays a repr
    sided = PostprocessPlan({"liver": 1, "kidneys": 2}, {"liver": "right", "kidneys": "both"})
    assert sided.describe() == ("liver: keep the largest connected component right of the body's midline; "
                                "kidneys: keep the 2 largest connected components, one on each side of the "
                                "body's midline; every other organ as predicted")


def test_training_prints_the_plan_in_words(phantom_datasets, tmp_path, capsys):
    ct, _ = phantom_datasets(4, 4)
    code = main(["train", "--site", f"ct={ct}", "--mode", "local", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "2", "--threads", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert code == 0
    (line,) = [line for line in out.splitlines() if "post-processing decided" in line]
    assert "PostprocessPlan" not in line
    assert line.endswith("every organ as predicted") or "connected component" in line


def _two_cubes() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((12, 12, 12), bool)
    a[2:6, 2:6, 2:6] = True
    return a, np.roll(a, 1, axis=0)


def test_hd95_warns_of_nothing_and_ignoring_drops_a_warning_unless_debugging(monkeypatch):
    pred, ref = _two_cubes()
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hd95_mm(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(1.0)
        with ignoring(FutureWarning, r".*an old option"):
            warnings.warn("an old option is deprecated", FutureWarning)
    assert not caught
    monkeypatch.setenv(DEBUG_ENV, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ignoring(FutureWarning, r".*an old option"):
            warnings.warn("an old option is deprecated", FutureWarning)
    assert [w for w in caught if issubclass(w.category, FutureWarning) and "an old option" in str(w.message)]


def test_evaluate_prints_no_third_party_warning(tmp_path, make_nnunet):
    """``fedgin evaluate --pred`` in a fresh interpreter with Python's default warning filters."""
    data = make_nnunet("Dataset001_Site")
    pred = tmp_path / "pred"
    pred.mkdir()
    for label in (data / "labelsTr").glob("*.nii.gz"):
        (pred / label.name).write_bytes(label.read_bytes())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", DEBUG_ENV)}
    args = [sys.executable, "-m", "fedgin.cli", "evaluate", "--pred", str(pred), "--ref", str(data),
            "--out", str(tmp_path / "eval"), "--no-qa"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-2000:]
    # --debug shows every warning (``ignoring`` filters none: the unit test above); the scoring
    # path itself raises none any more (HD95 is fedgin's own, no MONAI call)
    debug = subprocess.run([*args[:3], "--debug", *args[3:-3], "--out", str(tmp_path / "eval2"), "--no-qa"],
                           capture_output=True, text=True, timeout=600, env=env)
    assert debug.returncode == 0, debug.stderr[-2000:]
    assert json.loads((tmp_path / "eval2" / "summary.json").read_text())["metric_per_case"]


def test_ray_workers_start_with_flowers_warnings_off_unless_debugging(monkeypatch):
    monkeypatch.delenv(FLOWER_LOG_LEVEL_ENV, raising=False)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with worker_environment():
        assert os.environ[FLOWER_LOG_LEVEL_ENV] == "ERROR"
    assert FLOWER_LOG_LEVEL_ENV not in os.environ  # put back: later processes log as before
    monkeypatch.setenv(DEBUG_ENV, "1")
    with worker_environment():
        assert FLOWER_LOG_LEVEL_ENV not in os.environ
    monkeypatch.delenv(DEBUG_ENV)
    monkeypatch.setenv(FLOWER_LOG_LEVEL_ENV, "INFO")  # a user's own choice stands
    with worker_environment():
        assert os.environ[FLOWER_LOG_LEVEL_ENV] == "INFO"
