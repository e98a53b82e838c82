"""Training learns: one phantom case per site is overfit to a high 3D Dice within a bounded number
of steps, through every mode (local, centralized, federated on Flower's simulation engine).

A sign error in the loss, labels misaligned with images after augmentation or preprocessing, a
learning-rate schedule that ends the run at zero, or weights lost between federated rounds all
fail these tests.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from fedgin.config import SiteSpec, resolve
from fedgin.engine.runs import train_non_federated
from fedgin.evaluation.scoring import evaluate

#: The recipe that must learn: GIN off (it slows learning on purpose) and no augmentation, so the
#: bound on steps measures the engine; everything else is the quick preset's.
OVERFIT = {"gin": False, "intensity_augment": False, "spatial_augment": False, "lr": 3e-3,
           "steps_per_epoch": 25, "batch_size": 6, "validate": False}
MIN_DICE = 0.8
#: organs big enough to reach MIN_DICE on a 2.5 mm grid in a few hundred steps
ORGANS = ("liver", "kidneys", "spleen")


@pytest.fixture(scope="module")
def one_case_sites(phantom_datasets) -> dict[str, Path]:
    """One CT and one MRI phantom case; a dataset this small has no validation or test case, so
    the case trains and is then scored."""
    ct, mri = phantom_datasets(1, 1, 3)
    return {"ct": ct, "mri": mri}


def _config(out: Path, sites: dict[str, Path], mode: str, epochs: int, cache: Path, **kw):
    return resolve("quick", command="test", out=str(out), sites=tuple(SiteSpec(n, str(p)) for n, p in sites.items()),
                   mode=mode, cache_dir=str(cache), device="cpu", train_overrides={**OVERFIT, "epochs": epochs}, **kw)


def _dice(model: Path, sites: dict[str, Path], out: Path, cache: Path) -> dict[str, float]:
    summary = evaluate(str(model), [str(p) for p in sites.values()], str(out), cases="all", device="cpu",
                       cache_dir=str(cache))
    scores = {}
    for modality, stats in summary["by_modality"].items():
        if modality != "all":
            scores[modality] = sum(stats[o]["dice"]["mean"] for o in ORGANS) / len(ORGANS)
    return scores


@pytest.mark.slow
def test_local_training_overfits_one_case(one_case_sites, tmp_path):
    sites = {"ct": one_case_sites["ct"]}
    out = train_non_federated(_config(tmp_path / "run", sites, "local", 8, tmp_path / "cache"), log=lambda _: None)
    scores = _dice(out / "ct", sites, tmp_path / "eval", tmp_path / "cache")
    assert scores["CT"] > MIN_DICE, scores


@pytest.mark.slow
def test_centralized_training_overfits_one_case_per_modality(one_case_sites, tmp_path):
    # the pooled model gets both sites' steps, as in an experiment
    cfg = _config(tmp_path / "run", one_case_sites, "centralized", 8, tmp_path / "cache")
    cfg = replace(cfg, train=replace(cfg.train, steps_per_epoch=2 * OVERFIT["steps_per_epoch"]))
    out = train_non_federated(cfg, log=lambda _: None)
    scores = _dice(out, one_case_sites, tmp_path / "eval", tmp_path / "cache")
    assert min(scores.values()) > MIN_DICE, scores


@pytest.mark.slow
def test_federated_training_overfits_one_case_per_site(one_case_sites, tmp_path):
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedgin.federated.launcher import federate

    cfg = _config(tmp_path / "run", one_case_sites, "federated", 12, tmp_path / "cache", rounds=6, local_epochs=2)
    out = federate(cfg, log=lambda _: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({x["round"] for x in lines}) == [1, 2, 3, 4, 5, 6]
    scores = _dice(out, one_case_sites, tmp_path / "eval", tmp_path / "cache")
    assert min(scores.values()) > MIN_DICE, scores
