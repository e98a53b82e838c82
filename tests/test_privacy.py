"""What leaves a site: every reply of fedgin's ClientApp holds the model's own arrays and a fixed
set of scalar metrics, nothing else (no image or slice, no case id, no path, no dataset name).

The ClientApp is called as Flower calls it (``app(message, context)`` with a ``train`` or
``evaluate`` instruction built like the server's strategy builds it), in simulation
(``node_config = {"partition-id": ...}``) and in a deployment (``{"data-dir": ..., ...}``).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (DEFAULT_TTL, Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord,
                      RecordDict)
from flwr.common.serde import recorddict_to_proto

from conftest import write_nnunet
from fedgin.config import SiteSpec, resolve
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import write_volume
from fedgin.engine.model import build_model
from fedgin.federated.client_app import app
from fedgin.federated.task import run_config_to_json, state_to_numpy

ORGANS = get_scheme("abdomen5").organs
DICE_KEYS = {f"dice-{o}" for o in ORGANS}
TRAIN_METRICS = {"num-examples", "loss", "seconds", "modality", "site-index", "lr"} | DICE_KEYS
EVALUATE_METRICS = {"num-examples", "modality", "site-index"} | DICE_KEYS | {f"dice-pp-{o}" for o in ORGANS}


@pytest.fixture(scope="module")
def phantom_sites(phantom_datasets) -> tuple[Path, Path]:
    """4 CT cases (2 train, 1 validation, 1 test) and 3 MRI cases (2 train, no validation)."""
    return phantom_datasets(4, 3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("privacy-cache")


def run_config(tmp_path: Path, cache: Path, sites: tuple[SiteSpec, ...]):
    return resolve("quick", command="test", out=str(tmp_path / "run"), sites=sites, cache_dir=str(cache),
                   train_overrides={"steps_per_epoch": 2, "batch_size": 2, "num_threads": 1},
                   local_epochs=1, rounds=1)


def instruction(kind: str, cfg, server_round: int = 1) -> tuple[Message, dict[str, np.ndarray]]:
    """A ``train``/``evaluate`` message as fedgin's strategy sends it: global arrays + config."""
    global_arrays = state_to_numpy(build_model(cfg.model).state_dict())
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in global_arrays.items()}),
        "config": ConfigRecord({"run-config": run_config_to_json(cfg), "server-round": server_round}),
    })
    # as delivered to a SuperNode: the SuperLink has filled in the metadata
    metadata = Metadata(run_id=1, message_id=f"{kind}-{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                        ttl=DEFAULT_TTL, message_type=kind)
    return Message(content=content, metadata=metadata), global_arrays


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def forbidden_strings(dataset: Path) -> list[str]:
    """Case ids, file names, the dataset folder name and its absolute path."""
    names = [dataset.name, str(dataset), str(dataset.parent)]
    for image in sorted((dataset / "imagesTr").glob("*.nii.gz")):
        names += [image.name, image.name.removesuffix("_0000.nii.gz")]
    return names


def assert_only_weights_and_scalars(reply: Message, cfg, expected_records: dict[str, type],
                                    metric_keys: set[str], forbidden: list[str]) -> dict:
    """Walk every record of ``reply``; returns its metrics."""
    assert not reply.has_error(), reply.error
    content = reply.content
    assert {k: type(v) for k, v in content.items()} == expected_records
    assert not content.config_records, "a reply carries no config record"

    reference = build_model(cfg.model).state_dict()
    slice_size = set(cfg.preprocess.slice_size)
    strings: list[str] = list(content.keys())
    for record in content.array_records.values():
        assert set(record) == set(reference), "exactly the model's state_dict keys"
        for key, array in record.items():
            strings.append(key)
            value = array.numpy()
            assert tuple(value.shape) == tuple(reference[key].shape), key
            assert str(value.dtype) == str(reference[key].dtype).removeprefix("torch."), key
            # a slice-sized axis is allowed only in a parameter of that very shape (128 channels of
            # the quick U-Net), and nothing ends in an H x W slice
            if slice_size & set(value.shape):
                assert key in reference and tuple(value.shape) == tuple(reference[key].shape), key
            assert tuple(value.shape[-2:]) != tuple(cfg.preprocess.slice_size), key
            assert np.all(np.isfinite(value)), key

    metrics = {}
    for record in content.metric_records.values():
        assert set(record) == metric_keys, sorted(set(record) ^ metric_keys)
        for key, value in record.items():
            strings.append(key)
            assert type(value) in (int, float), (key, value)  # scalars only: no lists, no strings
            metrics[key] = value
    assert metrics["modality"] in (0, 1) and type(metrics["site-index"]) is int
    assert type(metrics["num-examples"]) is int and metrics["num-examples"] > 0

    for text in strings + [str(getattr(reply.metadata, f)) for f in ("message_type", "group_id")]:
        for secret in forbidden:
            assert secret not in text, (secret, text)
    # the wire form too: nothing of the forbidden strings anywhere in the serialised reply
    wire = recorddict_to_proto(content).SerializeToString()
    for secret in forbidden:
        assert secret.encode() not in wire, secret
    return metrics


def test_simulation_replies_hold_only_weights_and_scalar_metrics(tmp_path, phantom_sites, cache):
    ct, _ = phantom_sites
    cfg = run_config(tmp_path, cache, (SiteSpec("ct", str(ct)),))
    ctx = context({"partition-id": 0, "num-partitions": 1})

    msg, global_arrays = instruction("train", cfg)
    reply = app(msg, ctx)
    metrics = assert_only_weights_and_scalars(reply, cfg, {"arrays": ArrayRecord, "metrics": MetricRecord},
                                              TRAIN_METRICS, forbidden_strings(ct))
    assert metrics["modality"] == 0 and metrics["site-index"] == 0
    assert all(math.isfinite(metrics[k]) for k in DICE_KEYS)  # the CT site has a validation case
    trained = reply.content["arrays"]
    assert any(not np.array_equal(trained[k].numpy(), v) for k, v in global_arrays.items()), "the model trained"

    msg, _ = instruction("evaluate", cfg)
    reply = app(msg, ctx)
    metrics = assert_only_weights_and_scalars(reply, cfg, {"metrics": MetricRecord}, EVALUATE_METRICS,
                                              forbidden_strings(ct))
    assert metrics["num-examples"] == 1


@pytest.mark.parametrize("site_name", ["mri", None], ids=["named-site", "unnamed-site"])
def test_deployment_replies_hold_only_weights_and_scalar_metrics(site_name, tmp_path, phantom_sites, cache):
    """A SuperNode names its own data (``--node-config "data-dir=... modality=..."``); the server's
    run config lists site names only (``ct=- mri=-``)."""
    _, mri = phantom_sites
    cfg = run_config(tmp_path, cache, (SiteSpec("ct", "-"), SiteSpec("mri", "-")))
    node = {"data-dir": str(mri), "modality": "MRI"} | ({"site-name": site_name} if site_name else {})
    ctx = context(node)
    forbidden = forbidden_strings(mri)

    msg, _ = instruction("train", cfg, server_round=3)
    metrics = assert_only_weights_and_scalars(app(msg, ctx), cfg, {"arrays": ArrayRecord, "metrics": MetricRecord},
                                              TRAIN_METRICS, forbidden)
    assert metrics["modality"] == 1
    assert all(math.isnan(metrics[k]) for k in DICE_KEYS)  # 3 MRI cases: no validation case
    if site_name:
        assert metrics["site-index"] == 1

    msg, _ = instruction("evaluate", cfg, server_round=3)
    assert_only_weights_and_scalars(app(msg, ctx), cfg, {"metrics": MetricRecord}, EVALUATE_METRICS, forbidden)


def test_fedbn_keeps_the_site_state_out_of_the_reply(tmp_path, phantom_sites, cache):
    """Under FedBN the site keeps its normalisation layers on disk; the reply is still the full
    model state and the same scalar metrics."""
    ct, _ = phantom_sites
    cfg = replace(run_config(tmp_path, cache, (SiteSpec("ct", str(ct)),)), strategy="fedbn")
    state_dir = tmp_path / "site-state"
    ctx = context({"partition-id": 0, "state-dir": str(state_dir)})
    msg, _ = instruction("train", cfg)
    assert_only_weights_and_scalars(app(msg, ctx), cfg, {"arrays": ArrayRecord, "metrics": MetricRecord},
                                    TRAIN_METRICS, forbidden_strings(ct))
    assert (state_dir / "ct" / "local_norm_layers.npz").is_file()


def test_a_failing_site_sends_no_path_or_case_id_in_its_error(tmp_path, cache):
    """When the ClientApp raises, the SuperNode replies ``Error(reason=str(type(ex)) + ":<'" +
    str(ex) + "'>")`` (flwr/supernode/runtime/run_clientapp.py) and fedgin's strategy logs that
    reason on the server: it must not carry the site's file names."""
    site = write_nnunet(tmp_path / "Dataset001_Hospital", cases=["patient_0042", "patient_0043"])
    image = site / "imagesTr" / "patient_0042_0000.nii.gz"
    write_volume(image, np.full((24, 20, 6), np.nan, np.float32), np.diag([1.5, 1.5, 3.0, 1.0]))
    cfg = run_config(tmp_path, cache, (SiteSpec("ct", "-"),))
    msg, _ = instruction("train", cfg)
    try:
        reply = app(msg, context({"data-dir": str(site), "modality": "CT", "site-name": "ct"}))
        reason = reply.error.reason if reply.has_error() else ""
    except Exception as exc:  # noqa: BLE001 - what Flower does with any exception
        reason = str(type(exc)) + ":<'" + str(exc) + "'>"
    assert reason, "the site's failure is reported"
    for secret in forbidden_strings(site):
        assert secret not in reason, (secret, reason)
