"""Post-processing (nnU-Net's keep-the-largest-components rule, decided on validation cases): the
rule on real arrays, the decision, the plan inside checkpoints, ``predict``/``evaluate`` applying
it on the input's grid, and every training mode deciding it (local, centralized, federated).

Everything runs on tiny NIfTI datasets written to ``tmp_path``; the runs train one step.
"""

from __future__ import annotations

from dataclasses import replace

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedgin.evaluation.scoring
import fedgin.evaluation.prediction
from conftest import ORGAN_BOXES, SHAPE
from fedgin.cli import main
from fedgin.config import SiteSpec, resolve
from fedgin.data.labels import get_scheme
from fedgin.data.preprocess import PreprocessConfig
from fedgin.data.sites import CaseData
from fedgin.engine.checkpoint import load_checkpoint, save_checkpoint
from fedgin.engine.model import ModelConfig, build_model
from fedgin.data.body import BodySide, body_side
from fedgin.engine.postprocess import (SIDE_OF_BODY, PostprocessPlan, candidate_plan, decide_plan,
                                      keep_largest_components, validation_scores)
from fedgin.engine.runs import decide_postprocessing
from fedgin.engine.trainer import Trainer
from fedgin.errors import ModelError
from fedgin.federated.recorder import RoundRecorder
from fedgin.federated.task import evaluate_round, site_data, state_to_numpy
from loopback import tiny_config

ABDOMEN5 = get_scheme("abdomen5")
ABDOMEN6 = get_scheme("abdomen6")
THREADS = "1"
TINY = ["--steps-per-epoch", "1", "--batch-size", "2", "--threads", THREADS]


def box(name: str) -> tuple[slice, slice, slice]:
    x0, x1, y0, y1, z0, z1 = ORGAN_BOXES[name]
    return slice(x0, x1), slice(y0, y1), slice(z0, z1)


#: a voxel far from every organ box of the fixtures' 24 x 20 x 6 volumes
SPECK = (23, 0, 0)


def organ_map(scheme=ABDOMEN5, *, speck: int | None = None) -> np.ndarray:
    """``SHAPE`` uint8 map: liver, both kidneys (one label in abdomen5), spleen; plus one voxel of
    label ``speck`` at :data:`SPECK`."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[box("liver")] = scheme.label_ids["liver"]
    for kidney in ("kidney_right", "kidney_left"):
        labels[box(kidney)] = scheme.id_of_fine(kidney)
    labels[box("spleen")] = scheme.label_ids["spleen"]
    if speck is not None:
        labels[SPECK] = speck
    return labels


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- the rule on arrays ---------------------------------------------------------------------------


def test_keep_largest_components_keeps_the_n_largest_and_removes_a_far_speck():
    labels = organ_map(speck=1)
    labels[20:22, 17:19, 4:6] = 1  # a second, 8-voxel false positive
    before = labels.copy()

    one = keep_largest_components(labels, 1, 1)
    assert np.array_equal(labels, before)  # the input is left as it was
    assert one.dtype == np.uint8 and one.shape == SHAPE
    assert np.array_equal(one == 1, organ_map() == 1)  # only the liver box is left of label 1
    assert np.array_equal(one[before != 1], before[before != 1])  # other labels untouched

    two = keep_largest_components(labels, 1, 2)
    assert two[SPECK] == 0 and (two[20:22, 17:19, 4:6] == 1).all()  # the 8 voxels beat the speck
    assert np.array_equal(keep_largest_components(labels, 1, 3), labels)  # n >= components: no change
    assert np.array_equal(keep_largest_components(labels, 6, 1), labels)  # label not present


def test_components_are_26_connected():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0:2, 0:2, 0:2] = 1
    labels[2, 2, 2] = 1  # touches the cube at a corner only
    labels[5, 5, 5] = 1  # detached
    out = keep_largest_components(labels, 1, 1)
    assert out[2, 2, 2] == 1 and out[5, 5, 5] == 0


def test_keep_largest_components_refuses_bad_arguments():
    with pytest.raises(ValueError, match="3D"):
        keep_largest_components(np.zeros((4, 4), np.uint8), 1, 1)
    with pytest.raises(ValueError, match=">= 1"):
        keep_largest_components(np.zeros((4, 4, 4), np.uint8), 1, 0)


def test_merged_kidneys_keep_two_components_and_split_kidneys_one_each():
    assert ABDOMEN5.expected_components == {"liver": 1, "kidneys": 2, "spleen": 1, "pancreas": 1, "gallbladder": 1}
    assert set(ABDOMEN6.expected_components.values()) == {1}

    kidneys = ABDOMEN5.label_ids["kidneys"]
    labels = organ_map(speck=kidneys)
    out = candidate_plan(ABDOMEN5).apply(labels, ABDOMEN5)
    assert np.array_equal(out, organ_map())  # both kidneys kept, the speck gone

    right, left = ABDOMEN6.label_ids["kidney_right"], ABDOMEN6.label_ids["kidney_left"]
    out6 = candidate_plan(ABDOMEN6).apply(organ_map(ABDOMEN6, speck=left), ABDOMEN6)
    assert np.array_equal(out6, organ_map(ABDOMEN6))  # each kidney kept, the speck gone
    two_rights = organ_map(ABDOMEN6)
    two_rights[box("kidney_left")] = right  # kept apart, a "right kidney" on each side is one too many
    out6 = candidate_plan(ABDOMEN6).apply(two_rights, ABDOMEN6)
    assert (out6[box("kidney_right")] == right).all()  # equal sizes: the first in C order stays
    assert not out6[box("kidney_left")].any()


# --- the plan and the decision --------------------------------------------------------------------


def test_plan_round_trips_and_refuses_what_it_cannot_apply():
    plan = PostprocessPlan({"liver": 1, "kidneys": 2, "spleen": 0})
    assert plan.components == {"liver": 1, "kidneys": 2}  # 0: not post-processed
    assert repr(plan) == "PostprocessPlan(liver=1, kidneys=2)"
    assert plan.to_dict() == {"keep_largest_components": {"liver": 1, "kidneys": 2}, "side_of_body": {},
                              "connectivity": 26}
    assert PostprocessPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert PostprocessPlan.from_dict(None).empty and PostprocessPlan.from_dict({}).empty
    labels = organ_map(speck=1)
    assert PostprocessPlan().apply(labels, ABDOMEN5) is labels  # the empty plan changes nothing
    with pytest.raises(ValueError, match="kidneys"):
        plan.apply(labels, ABDOMEN6)
    with pytest.raises(ValueError, match="integer >= 0"):
        PostprocessPlan({"liver": -1})
    with pytest.raises(ValueError, match="connectivity"):
        PostprocessPlan.from_dict({"keep_largest_components": {"liver": 1}, "connectivity": 6})


def _blob(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


@pytest.mark.parametrize("flip", [False, True], ids=["ras-voxels", "lps-voxels"])
def test_a_lateral_organ_keeps_its_largest_component_on_its_side_of_the_body(flip):
    """The wrong "spleen" in the liver is larger than the true one on the left: size alone keeps
    the wrong blob (Dice 0, HD95 over the body's width), the side rule the true one; the liver and
    each kidney likewise. Sides are world RAS x (+x the patient's right), whatever the voxel order."""
    shape = (60, 40, 20)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    if flip:  # the first voxel axis runs to the patient's left (DICOM's LPS order)
        affine[0, 0], affine[0, 3] = -2.0, 118.0
    # the body fills the grid; its midline is the grid's centre, world x 59
    image = np.full(shape, 40.0, np.float32)
    body = body_side(image, affine, "CT")
    assert body.midline_x == pytest.approx(59.0)
    right = (lambda i: 59 - i) if flip else (lambda i: i)  # voxel index i -> i on the right-hand side
    spleen_id, liver_id, kidney_id = (ABDOMEN5.label_ids[o] for o in ("spleen", "liver", "kidneys"))
    labels = np.zeros(shape, np.uint8)
    labels[_blob(shape, (right(45), 20, 10), 7)] = spleen_id  # wrong, right of the midline, larger
    labels[_blob(shape, (right(8), 20, 10), 4)] = spleen_id   # true, left
    labels[_blob(shape, (right(8), 5, 10), 3)] = liver_id     # wrong, left, larger than ...
    labels[_blob(shape, (right(40), 5, 10), 2)] = liver_id    # ... the true one (right)
    for x, r in ((right(42), 3), (right(54), 3), (right(15), 2)):  # two kidneys right, one left
        labels[_blob(shape, (x, 35, 5 + 2 * r), r)] = kidney_id
    plan = candidate_plan(ABDOMEN5)
    assert dict(plan.sides) == {"liver": "right", "gallbladder": "right", "spleen": "left", "kidneys": "both"}

    by_size = PostprocessPlan(ABDOMEN5.expected_components).apply(labels, ABDOMEN5, body)
    assert by_size[_blob(shape, (right(45), 20, 10), 7)].max() == spleen_id  # size keeps the wrong one
    sided = plan.apply(labels, ABDOMEN5, body)
    assert (sided[_blob(shape, (right(8), 20, 10), 4)] == spleen_id).all()
    assert not (sided[_blob(shape, (right(45), 20, 10), 7)] == spleen_id).any()
    assert (sided[_blob(shape, (right(40), 5, 10), 2)] == liver_id).all()
    assert not (sided[_blob(shape, (right(8), 5, 10), 3)] == liver_id).any()
    kept = [bool((sided[_blob(shape, (x, 35, 5 + 2 * r), r)] == kidney_id).all())
            for x, r in ((right(42), 3), (right(54), 3), (right(15), 2))]
    assert kept.count(True) == 2 and kept[2]  # one right kidney and the left one
    # without the case's body (a preprocessed plane) the rule is size alone
    assert np.array_equal(plan.apply(labels, ABDOMEN5), by_size)


def test_the_side_rule_falls_back_to_size_and_the_plan_records_it():
    """An organ with no component on its side keeps its largest (as before); the sides travel in
    the plan (old plans without them load as size-only) and only for organs it post-processes."""
    shape = (40, 20, 10)
    body = BodySide(tuple(tuple(r) for r in np.eye(4)), midline_x=19.5)
    labels = np.zeros(shape, np.uint8)
    spleen = ABDOMEN5.label_ids["spleen"]
    labels[_blob(shape, (30, 10, 5), 3)] = spleen  # both on the right
    labels[_blob(shape, (38, 10, 5), 2)] = spleen
    out = candidate_plan(ABDOMEN5).apply(labels, ABDOMEN5, body)
    assert (out[_blob(shape, (30, 10, 5), 3)] == spleen).all() and not (out[_blob(shape, (38, 10, 5), 2)] == spleen).any()
    plan = PostprocessPlan({"liver": 1, "spleen": 1}, SIDE_OF_BODY)
    assert dict(plan.sides) == {"liver": "right", "spleen": "left"}
    assert plan.to_dict()["side_of_body"] == {"liver": "right", "spleen": "left"}
    assert PostprocessPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert PostprocessPlan.from_dict({"keep_largest_components": {"liver": 1}}).sides == ()
    with pytest.raises(ValueError, match="right, left or both"):
        PostprocessPlan({"liver": 1}, {"liver": "up"})


def test_body_side_finds_the_midline_of_an_mri_body_off_centre():
    image = np.zeros((50, 30, 12), np.float32)
    image[30:46, 5:25, :] = 200.0  # the body in voxels 30-45 along x
    image += np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)  # background noise
    body = body_side(image, np.diag([1.5, 1.5, 4.0, 1.0]), "MRI", slab=5)
    assert body.midline_x == pytest.approx(1.5 * 37.5, abs=0.1)


def test_decide_plan_keeps_postprocessing_only_where_it_does_not_lower_dice():
    plain = {"liver": 0.80, "kidneys": 0.70, "spleen": 0.90, "pancreas": None, "gallbladder": float("nan")}
    pp = {"liver": 0.85, "kidneys": 0.70, "spleen": 0.89, "pancreas": 0.5, "gallbladder": 0.9}
    assert decide_plan(plain, pp, ABDOMEN5) == PostprocessPlan({"liver": 1, "kidneys": 2}, SIDE_OF_BODY)  # tie keeps
    assert decide_plan({}, {}, ABDOMEN5).empty
    assert decide_plan({"liver": 0.5}, {}, ABDOMEN5).empty  # no pp score: no post-processing


class LabelEcho(torch.nn.Module):
    """A "model" whose prediction is its input: logits one-hot in ``round(x)`` (B x C x H x W)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x[:, 0].round().long(), self.num_classes).permute(0, 3, 1, 2).float() * 10


def test_validation_scores_without_and_with_the_candidate():
    truth = organ_map()
    pred = organ_map(speck=ABDOMEN5.label_ids["liver"])
    pred[box("spleen")] = 0
    pred[0:2, 18:20, 0:2] = ABDOMEN5.label_ids["spleen"]  # the spleen only as a false positive
    annotated = np.ones(ABDOMEN5.num_classes, bool)
    annotated[ABDOMEN5.label_ids["gallbladder"]] = False
    case = CaseData("c", "CT", pred.astype(np.float32), truth, annotated, None, None)

    plain, pp = validation_scores(LabelEcho(ABDOMEN5.num_classes), [case], ABDOMEN5, torch.device("cpu"))

    liver = int((truth == 1).sum())
    assert plain["liver"] == pytest.approx(2 * liver / (2 * liver + 1)) and pp["liver"] == 1.0
    assert plain["kidneys"] == pp["kidneys"] == 1.0
    assert plain["spleen"] == pp["spleen"] == 0.0
    assert plain["pancreas"] is None and pp["pancreas"] is None  # absent from both
    assert plain["gallbladder"] is None and pp["gallbladder"] is None  # not annotated
    assert decide_plan(plain, pp, ABDOMEN5) == PostprocessPlan({"liver": 1, "kidneys": 2, "spleen": 1}, SIDE_OF_BODY)


# --- checkpoints ----------------------------------------------------------------------------------


def _checkpoint(path: Path, plan: PostprocessPlan | None) -> Path:
    cfg = ModelConfig(channels=(4, 8, 16, 32), out_channels=ABDOMEN5.num_classes)
    return save_checkpoint(path, build_model(cfg).state_dict(), model_config=cfg, scheme=ABDOMEN5,
                           preprocess=PreprocessConfig(), sites=[{"name": "ct", "modality": "CT"}],
                           meta={"epoch": 1}, postprocess=plan)


def test_a_checkpoint_carries_its_plan_and_an_old_one_loads_with_none(tmp_path):
    plan = PostprocessPlan({"liver": 1, "kidneys": 2})
    assert load_checkpoint(_checkpoint(tmp_path / "new.pt", plan)).postprocess == plan
    assert load_checkpoint(_checkpoint(tmp_path / "none.pt", None)).postprocess.empty

    old = tmp_path / "old.pt"
    payload = torch.load(_checkpoint(old, plan), weights_only=True)
    del payload["postprocess"]  # as written before plans existed
    torch.save(payload, old)
    assert load_checkpoint(old).postprocess == PostprocessPlan()

    payload["postprocess"] = {"keep_largest_components": {"lungs": 1}, "connectivity": 26}
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="invalid post-processing plan.*lungs"):
        load_checkpoint(tmp_path / "bad.pt")


# --- predict and evaluate apply the plan ------------------------------------------------------------


def test_predict_applies_the_checkpoints_plan_unless_told_not_to(capsys, tmp_path, make_nnunet, monkeypatch):
    dataset = make_nnunet("Dataset021_CT", cases=("case_000",))
    src = dataset / "imagesTr" / "case_000_0000.nii.gz"
    model = _checkpoint(tmp_path / "model.pt", PostprocessPlan({"liver": 1}))
    raw = organ_map(speck=ABDOMEN5.label_ids["liver"])
    # the network's output on the input grid, with a far liver speck
    monkeypatch.setattr(fedgin.evaluation.prediction, "predict_labels", lambda net, pre, device, compile=False: raw.copy())

    rc, _, err = cli(capsys, "predict", "-i", src, "-o", tmp_path / "pp", "--model", model, "--masks")
    assert rc == 0, err
    labels = np.asanyarray(nib.load(str(tmp_path / "pp" / "case_000.nii.gz")).dataobj)
    assert np.array_equal(labels, organ_map())  # speck gone, both kidneys kept
    liver_mask = np.asanyarray(nib.load(str(tmp_path / "pp" / "case_000_liver.nii.gz")).dataobj)
    assert liver_mask[SPECK] == 0
    args = json.loads((tmp_path / "pp" / "provenance.json").read_text())["arguments"]
    assert args["postprocess"] is True
    assert args["postprocess_plan"] == {"keep_largest_components": {"liver": 1}, "side_of_body": {},
                                        "connectivity": 26}

    rc, _, err = cli(capsys, "predict", "-i", src, "-o", tmp_path / "raw", "--model", model, "--no-postprocess")
    assert rc == 0, err
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "raw" / "case_000.nii.gz")).dataobj), raw)
    args = json.loads((tmp_path / "raw" / "provenance.json").read_text())["arguments"]
    assert args["postprocess"] is False and args["postprocess_plan"] is None


def test_evaluate_scores_the_postprocessed_prediction(capsys, tmp_path, make_nnunet, monkeypatch):
    dataset = make_nnunet("Dataset022_CT", cases=("case_000",))
    model = _checkpoint(tmp_path / "model.pt", PostprocessPlan({"liver": 1}))

    def reference_with_speck(net, pre, device, compile=False):  # the prediction: the reference plus a far liver blob
        ref, scheme = pre
        labels = ref.read(scheme)[1].copy()
        labels[22:24, 0:4, 0:3] = scheme.label_ids["liver"]  # 24 voxels: beyond HD95's 5% of the surface
        return labels

    monkeypatch.setattr(fedgin.evaluation.scoring, "load_case", lambda ref, scheme, cfg, cache_dir, **_: (ref, scheme))
    monkeypatch.setattr(fedgin.evaluation.scoring, "predict_labels", reference_with_speck)

    rc, _, err = cli(capsys, "evaluate", "--model", model, "--data", dataset, "--out", tmp_path / "pp",
                     "--cases", "all")
    assert rc == 0, err
    summary = json.loads((tmp_path / "pp" / "summary.json").read_text())
    assert summary["metric_per_case"][0]["metrics"]["liver"] == {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}
    assert summary["arguments"]["postprocess"] is True
    assert summary["arguments"]["postprocess_plan"]["keep_largest_components"] == {"liver": 1}

    rc, _, err = cli(capsys, "evaluate", "--model", model, "--data", dataset, "--out", tmp_path / "raw",
                     "--cases", "all", "--no-postprocess")
    assert rc == 0, err
    summary = json.loads((tmp_path / "raw" / "summary.json").read_text())
    liver = summary["metric_per_case"][0]["metrics"]["liver"]
    assert liver["dice"] < 1.0 and liver["hd95"] > 0.0
    assert summary["arguments"]["postprocess"] is False and summary["arguments"]["postprocess_plan"] is None


# --- every mode decides the plan on its validation cases --------------------------------------------


def _check_decision(run: Path, *, sites: list[str], validation_cases: int, epochs: int = 1) -> dict:
    record = json.loads((run / "postprocess.json").read_text())
    assert record["sites"] == sites and record["validation_cases"] == validation_cases
    plain = {o: v["plain"] for o, v in record["validation_dice"].items()}
    pp = {o: v["postprocessed"] for o, v in record["validation_dice"].items()}
    plan = decide_plan(plain, pp, ABDOMEN5)
    assert PostprocessPlan.from_dict(record["plan"]) == plan
    assert {o for o, v in record["validation_dice"].items() if v["applied"]} == set(plan.components)
    for name in ("last.pt", f"epoch_{epochs:03d}.pt"):
        ckpt = load_checkpoint(run / "checkpoints" / name)
        assert ckpt.postprocess == plan, name
        assert ckpt.meta["postprocess"] == record, name
    return record


def test_local_runs_decide_on_their_validation_cases(capsys, tmp_path, make_nnunet):
    ct = make_nnunet("Dataset031_CT", cases=[f"case_{i:03d}" for i in range(4)])  # 2 train, 1 val, 1 test
    small = make_nnunet("Dataset032_CT", cases=[f"case_{i:03d}" for i in range(3)])  # no validation case
    out = tmp_path / "local"
    rc, _, err = cli(capsys, "train", "--site", f"ct={ct}", "--site", f"small={small}", "--mode", "local",
                     "--out", out, "--epochs", "1", "--seed", "0", *TINY)
    assert rc == 0, err

    record = _check_decision(out / "ct", sites=["ct"], validation_cases=1)
    assert record["note"] is None
    assert any(v["plain"] is not None for v in record["validation_dice"].values())
    # the plain Dice is the epoch's validation Dice in metrics.jsonl
    (line,) = [json.loads(x) for x in (out / "ct" / "metrics.jsonl").read_text().splitlines()]
    assert {o: v["plain"] for o, v in record["validation_dice"].items()} == line["dice"]

    record = _check_decision(out / "small", sites=["small"], validation_cases=0)
    assert record["plan"]["keep_largest_components"] == {} and "no validation cases" in record["note"]


def test_centralized_pools_every_sites_validation_cases(capsys, tmp_path, make_nnunet):
    a = make_nnunet("Dataset033_CT", cases=[f"case_{i:03d}" for i in range(4)])
    b = make_nnunet("Dataset034_CT", cases=[f"case_{i:03d}" for i in range(4)])
    out = tmp_path / "central"
    rc, _, err = cli(capsys, "train", "--site", f"a={a}", "--site", f"b={b}", "--mode", "centralized",
                     "--out", out, "--epochs", "1", "--seed", "0", *TINY)
    assert rc == 0, err
    _check_decision(out, sites=["a", "b"], validation_cases=2)


def test_postprocessing_off_decides_an_empty_plan(tmp_path):
    cfg = replace(tiny_config(tmp_path / "run", {}), postprocess=False)
    plan, record = decide_postprocessing(cfg, LabelEcho(6), [], torch.device("cpu"))
    assert plan.empty and "--no-postprocess" in record["note"]


def test_evaluate_round_sends_dice_with_and_without_postprocessing(tmp_path, make_nnunet):
    ct = make_nnunet("Dataset035_CT", cases=[f"case_{i:03d}" for i in range(4)])
    cfg = tiny_config(tmp_path / "run", {"ct": ct})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    metrics = evaluate_round(cfg, cfg.sites[0], 0, state_to_numpy(model.state_dict()))

    assert set(metrics) == {"num-examples", "modality", "site-index",
                            *(f"dice-{o}" for o in ABDOMEN5.organs), *(f"dice-pp-{o}" for o in ABDOMEN5.organs)}
    assert metrics["num-examples"] == 1
    data = site_data(cfg, cfg.sites[0])
    trainer = Trainer(model, cfg.train, ABDOMEN5, torch.device("cpu"))
    expected = trainer.validate(data.val)  # the plain Dice is what validation always reported
    for organ in ABDOMEN5.organs:
        plain, pp = metrics[f"dice-{organ}"], metrics[f"dice-pp-{organ}"]
        if expected[organ] is None:
            assert math.isnan(plain) and math.isnan(pp), organ
        else:
            assert plain == expected[organ] and 0.0 <= pp <= 1.0, organ


def test_fedbn_validates_and_decides_on_the_model_it_saves(tmp_path, phantom_datasets, capsys):
    """Under FedBN a site trains with its own normalisation layers, but the round's Dice, and the
    plan decided from it, are of the checkpoint (the averaged layers): evaluating the saved model on
    the validation case reproduces them. The site's own layers (here far from the average) are
    scored beside it as ``dice_own_norm``, another model; predict says which layers it uses."""
    from fedgin.evaluation.scoring import evaluate_cases
    from fedgin.federated.task import norm_layer_keys

    ct, _ = phantom_datasets(4, 1)
    cfg = replace(tiny_config(tmp_path / "run", {"ct": ct}), strategy="fedbn")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    reference = model.state_dict()
    averaged = state_to_numpy(reference)
    own = {k: (averaged[k] * 3 + 0.5 if k.endswith("bias") else averaged[k] * -2) for k in norm_layer_keys(model)}
    metrics = evaluate_round(cfg, cfg.sites[0], 0, averaged, local_arrays=own)
    out = Path(cfg.out)
    out.mkdir(parents=True)
    recorder = RoundRecorder(cfg, out, log=lambda _: None)
    recorder.record_evaluate(1, [metrics])
    recorder.finish_round(1, averaged, reference, {})

    ckpt = load_checkpoint(out)
    site = site_data(cfg, cfg.sites[0])
    refs = [c for c in site.dataset.cases if c.case_id in site.split.val]
    (scored,) = evaluate_cases(ckpt, refs, cache_dir=tmp_path / "cache", with_hd95=False, postprocess=False)
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    decided = json.loads((out / "postprocess.json").read_text())["validation_dice"]
    for organ in ABDOMEN5.organs:
        assert line["dice"][organ] == scored["metrics"][organ]["dice"] == decided[organ]["plain"], organ
        assert line["dice_own_norm"][organ] == metrics[f"dice-own-norm-{organ}"]
    assert line["dice_own_norm"] != line["dice"]  # a different model: never reported as the checkpoint's

    assert main(["predict", "-i", str(refs[0].image), "-o", str(tmp_path / "pred"), "--model", str(out)]) == 0
    assert "FedBN model: its normalisation layers are the sites' average" in capsys.readouterr().out
    provenance = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert "sites' average" in json.dumps(provenance)


def _evaluate_reply(site_index: int, num_examples: int, plain: dict, pp: dict) -> dict:
    nan = float("nan")
    return {"num-examples": num_examples, "modality": site_index, "site-index": site_index,
            **{f"dice-{o}": plain.get(o, nan) for o in ABDOMEN5.organs},
            **{f"dice-pp-{o}": pp.get(o, nan) for o in ABDOMEN5.organs}}


def test_the_server_decides_from_the_sites_weighted_validation_dice(tmp_path):
    cfg = resolve("quick", command="test", out=str(tmp_path), sites=(SiteSpec("ct", "-"), SiteSpec("mri", "-")))
    replies = [
        # 3 validation cases: liver gains 0.1 with the candidate, pancreas too
        _evaluate_reply(0, 3, {"liver": 0.8, "kidneys": 0.7, "spleen": 0.9, "pancreas": 0.4},
                        {"liver": 0.9, "kidneys": 0.7, "spleen": 0.8, "pancreas": 0.5}),
        # 1 validation case: liver loses 0.2 (weighted, the gain wins), no pancreas annotation
        _evaluate_reply(1, 1, {"liver": 0.6, "kidneys": 0.7, "spleen": 0.9},
                        {"liver": 0.4, "kidneys": 0.7, "spleen": 0.9}),
    ]
    torch.manual_seed(0)
    reference = build_model(cfg.model).state_dict()

    def run_round(out: Path) -> dict:
        out.mkdir(exist_ok=True)  # the ServerApp makes the run dir
        recorder = RoundRecorder(cfg, out, log=lambda _: None)
        recorder.record_evaluate(1, replies)
        recorder.finish_round(1, state_to_numpy(reference), reference, {})
        return json.loads((out / "postprocess.json").read_text())

    record = run_round(tmp_path)
    expected = PostprocessPlan({"liver": 1, "kidneys": 2, "pancreas": 1}, SIDE_OF_BODY)  # kidneys: a tie keeps it
    assert PostprocessPlan.from_dict(record["plan"]) == expected
    dice = record["validation_dice"]
    assert dice["liver"]["plain"] == pytest.approx(0.75) and dice["liver"]["postprocessed"] == pytest.approx(0.775)
    assert dice["pancreas"] == {"plain": pytest.approx(0.4), "postprocessed": pytest.approx(0.5), "applied": True}
    assert dice["gallbladder"] == {"plain": None, "postprocessed": None, "applied": False}
    assert record["round"] == 1 and record["evaluate_sites"] == {"ct": 3, "mri": 1}
    for name in ("round_001.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "checkpoints" / name)
        assert ckpt.postprocess == expected and ckpt.meta["postprocess"] == record, name
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dice_pp"]["liver"] for r in lines] == [0.9, 0.4]
    assert lines[1]["dice_pp"]["pancreas"] is None

    # a resumed server, fed the same replies, decides the same
    assert run_round(tmp_path / "again") == record
