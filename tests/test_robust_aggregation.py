"""Robust aggregation (`--strategy fedmedian|fedtrimmedavg`): with one faulty site among three, the
FedAvg model is broken and the median's stays within 0.05 Dice of the run without the faulty site.

The rounds run in plain Python (fedgin's trainer at each site, fedgin's strategies on the server,
Flower messages between them), not on Flower's simulation engine: the aggregation is what is
tested, and Ray would only add start-up time. The faulty site replies with the global model it was
sent, scaled by 100 (a broken site, or a hostile one claiming 100 times the CT site's slices).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedgin.config import SiteSpec, resolve
from fedgin.engine.model import build_model
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.strategy import make_strategy, trim_fraction
from fedgin.federated.task import evaluate_round, run_config_to_json, state_to_numpy, train_round
from server_side import FakeGrid

pytestmark = pytest.mark.usefixtures("server_task_identity")

ORGANS = ("liver", "kidneys", "spleen")
ROUNDS = 6
#: the learning test's overfitting recipe on a coarse 5 mm grid, so that six short rounds learn
RECIPE = {"gin": False, "intensity_augment": False, "spatial_augment": False, "lr": 3e-3,
          "steps_per_epoch": 50, "batch_size": 6, "validate": False}


def _config(tmp_path: Path, ct: Path, mri: Path):
    sites = (SiteSpec("ct", str(ct)), SiteSpec("mri", str(mri)), SiteSpec("faulty", str(ct)))
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=sites, rounds=ROUNDS, local_epochs=1,
                  train_overrides=RECIPE)
    return replace(cfg, preprocess=replace(cfg.preprocess, spacing_mm=(5.0, 5.0), slice_size=(64, 64)))


def _reply(instruction, arrays, metrics):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def _federation(cfg, tmp_path, name: str, *, faulty: bool, rounds: int = ROUNDS) -> float:
    """Mean validation Dice (liver, kidneys, spleen; CT and MRI site) of the global model after
    ``rounds``; the third site is faulty, or absent."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        arrays = state_to_numpy(build_model(cfg.model).state_dict())
    sites = 3 if faulty else 2
    strategy = make_strategy(name, num_sites=sites, min_sites=sites, reference=dict(arrays),
                             recorder=RoundRecorder(cfg, tmp_path / name, log=lambda _: None),
                             run_config_json=run_config_to_json(cfg))
    for server_round in range(1, rounds + 1):
        instructions = strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                                ConfigRecord(), FakeGrid(range(1, sites + 1)))
        replies = []
        for index, instruction in enumerate(instructions):
            if index < 2:
                trained, metrics, _ = train_round(cfg, cfg.sites[index], index, arrays, server_round)
                replies.append(_reply(instruction, trained, metrics))
            else:
                replies.append(_reply(instruction, {k: v * 100 for k, v in arrays.items()},
                                      {**metrics, "site-index": index, "num-examples": 100 * metrics["num-examples"]}))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = {k: v.numpy() for k, v in aggregated.items()}
    dice = []
    for index in (0, 1):
        scores = evaluate_round(cfg, cfg.sites[index], index, arrays)
        dice += [scores[f"dice-{organ}"] for organ in ORGANS]
    return float(np.mean(dice))


@pytest.mark.slow
def test_the_median_outvotes_a_faulty_site_that_breaks_fedavg(phantom_datasets, tmp_path):
    ct, mri = phantom_datasets(4, 4)
    cfg = _config(tmp_path, ct, mri)
    clean = _federation(cfg, tmp_path, "fedavg", faulty=False)
    assert clean > 0.2, "the clean federation did not learn: the comparison would say nothing"
    # one round with the faulty site is enough to break FedAvg's model
    broken = _federation(cfg, tmp_path, "fedavg", faulty=True, rounds=1)
    assert broken < 0.05, broken
    robust = _federation(cfg, tmp_path, "fedmedian", faulty=True)
    assert abs(robust - clean) <= 0.05, (robust, clean)


def test_the_trimmed_mean_cuts_one_site_from_each_end_and_equals_the_median_for_three(tmp_path):
    assert [trim_fraction(None, n) for n in (3, 4, 5, 10)] == pytest.approx([1 / 3, 0.25, 0.2, 0.2], abs=1e-6)
    assert trim_fraction(0.1, 3) == 0.1
    sites = tuple(SiteSpec(f"s{i}", "-") for i in range(3))
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=sites)
    reference = {"w": np.zeros(5, np.float32)}
    values = [np.array([1, 2, 3, 4, 5], np.float32), np.array([2, 0, 3, 9, 5], np.float32),
              np.array([1e4, -1e4, 1e4, -1e4, 0], np.float32)]
    results = {}
    for name in ("fedmedian", "fedtrimmedavg", "fedavg"):
        strategy = make_strategy(name, num_sites=3, min_sites=3, reference=reference,
                                 recorder=RoundRecorder(cfg, tmp_path / name, log=lambda _: None),
                                 run_config_json=run_config_to_json(cfg))
        instructions = strategy.configure_train(1, ArrayRecord({"w": Array(reference["w"])}), ConfigRecord(),
                                                FakeGrid([1, 2, 3]))
        metrics = {"loss": 1.0, "seconds": 1.0, "modality": 0, "lr": 1e-3}
        replies = [_reply(m, {"w": v}, {**metrics, "site-index": i, "num-examples": 10 if i < 2 else 10_000})
                   for i, (m, v) in enumerate(zip(instructions, values))]
        arrays, _ = strategy.aggregate_train(1, replies)
        results[name] = arrays["w"].numpy()
    median = np.median(np.stack(values), axis=0)
    assert np.array_equal(results["fedmedian"], median)
    assert np.allclose(results["fedtrimmedavg"], median)
    # the honest sites' values bound the robust results; FedAvg follows the site claiming 10,000 slices
    assert np.all(np.abs(results["fedmedian"]) <= 9)
    assert np.abs(results["fedavg"]).max() > 1000
