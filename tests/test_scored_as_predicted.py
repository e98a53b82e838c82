"""What is scored is what a user gets: ``evaluate --model``, training-time validation and the
post-processing decision all see each case's image preprocessed alone (as ``fedgin predict``
does: a label reaching outside the body never widens the plane) and score on the input grid."""

from __future__ import annotations

import json
from dataclasses import replace
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgin.cli import main
from fedgin.data.cache import load_case
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import read_volume, write_volume
from fedgin.data.preprocess import PreprocessConfig
from fedgin.data.sites import load_validation_case
from fedgin.engine.checkpoint import load_checkpoint, save_checkpoint
from fedgin.engine.model import ModelConfig, build_model
from fedgin.engine.postprocess import PostprocessPlan, candidate_plan, validation_scores
from fedgin.engine.trainer import Trainer
from fedgin.config import TrainConfig
from fedgin.evaluation.scoring import evaluate_cases

SCHEME = get_scheme("abdomen5")
CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def wide_site(phantom_datasets, tmp_path_factory) -> Path:
    """A phantom CT site whose first case lies in a wide air field with a "liver" painted on the
    air far from the body: its label reaches outside the body box."""
    ct, _ = phantom_datasets(2, 1)
    root = Path(shutil.copytree(ct, tmp_path_factory.mktemp("wide") / ct.name))
    label_path = sorted((root / "labelsTr").glob("*.nii.gz"))[0]
    image_path = root / "imagesTr" / (label_path.name[:-len(".nii.gz")] + "_0000.nii.gz")
    image, affine = read_volume(image_path, kind="image")
    label, _ = read_volume(label_path, kind="label")
    nx, ny, nz = image.shape
    wide = np.full((nx + 90, ny, nz), -1000, np.int16)
    wide[:nx] = image
    wide_label = np.zeros(wide.shape, np.uint8)
    wide_label[:nx] = label
    wide_label[nx + 70:nx + 80, ny // 2:ny // 2 + 10, nz // 3:nz // 2] = 1  # on air, > 100 mm from the body
    write_volume(image_path, wide, affine, dtype=np.int16)
    write_volume(label_path, wide_label, affine, dtype=np.uint8)
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    cfg = ModelConfig(channels=(4, 8, 16, 32), out_channels=SCHEME.num_classes)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(path, build_model(cfg).state_dict(), model_config=cfg, scheme=SCHEME, preprocess=CFG,
                           sites=[{"name": "ct", "modality": "CT"}], meta={"epoch": 1},
                           postprocess=PostprocessPlan({"liver": 1, "kidneys": 2, "spleen": 1}))


def _cli(capsys, *args) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    _, err = capsys.readouterr()
    assert rc == 0, err
    return err


def test_the_case_s_label_would_widen_its_plane(wide_site, tmp_path):
    ref = open_dataset(wide_site, SCHEME).cases[0]
    widened = load_case(ref, SCHEME, CFG, tmp_path)
    alone = load_case(ref, SCHEME, CFG, tmp_path, image_only=True)
    assert widened.labels_outside_body > 0
    assert widened.image.shape[1] > alone.image.shape[1]  # the plane the old scoring saw is wider
    assert alone.label is None and widened.geometry != alone.geometry


def test_evaluate_model_equals_predict_then_evaluate_pred(wide_site, model_file, tmp_path, capsys):
    _cli(capsys, "evaluate", "--model", model_file, "--data", wide_site, "--out", tmp_path / "direct",
         "--cases", "all", "--cache-dir", tmp_path / "cache")
    _cli(capsys, "predict", "-i", wide_site / "imagesTr", "-o", tmp_path / "pred", "--model", model_file,
         "--modality", "CT")
    _cli(capsys, "evaluate", "--pred", tmp_path / "pred", "--ref", wide_site, "--out", tmp_path / "via_pred",
         "--cases", "all")
    direct = json.loads((tmp_path / "direct" / "summary.json").read_text())["metric_per_case"]
    via = json.loads((tmp_path / "via_pred" / "summary.json").read_text())["metric_per_case"]
    assert len(direct) == len(via) == 2
    by_case = {r["case"]: r["metrics"] for r in via}
    for record in direct:
        assert record["metrics"] == by_case[record["case"]], record["case"]


def test_validation_and_the_plan_score_on_the_input_grid_like_evaluate(wide_site, model_file, tmp_path):
    ckpt = load_checkpoint(model_file)
    model = ckpt.build(torch.device("cpu"))
    ref = open_dataset(wide_site, SCHEME).cases[0]
    case = load_validation_case(ref, SCHEME, CFG, tmp_path)
    assert case.reference.shape == read_volume(ref.image, kind="image")[0].shape  # the input grid

    trainer = Trainer(model, TrainConfig(gin=False), SCHEME, torch.device("cpu"))
    validated = trainer.validate([case])
    plain, pp = validation_scores(model, [case], SCHEME, torch.device("cpu"))
    raw = evaluate_cases(ckpt, [ref], cache_dir=tmp_path, with_hd95=False, postprocess=False)[0]["metrics"]
    ckpt_pp = replace(ckpt, postprocess=candidate_plan(SCHEME))
    post = evaluate_cases(ckpt_pp, [ref], cache_dir=tmp_path, with_hd95=False)[0]["metrics"]
    for organ in SCHEME.organs:
        assert validated[organ] == plain[organ] == raw[organ]["dice"], organ
        assert pp[organ] == post[organ]["dice"], organ
