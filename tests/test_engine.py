"""End to end: ``fedgin train``, ``fedgin evaluate`` and ``fedgin predict`` through ``fedgin.cli.main``.

Everything runs on small phantom datasets written to temporary folders with tiny settings (one or
two epochs of a few steps, batch 4, one torch thread). The module-scoped fixtures train once and are
shared by the tests that only read their outputs; they pass ``--cache-dir`` explicitly because the
autouse ``FEDGIN_CACHE_DIR`` fixture is function-scoped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import fedgin.engine.runs
import fedgin.evaluation.scoring
from fedgin.cli import main
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import axcodes_of, write_volume
from fedgin.data.preprocess import PreprocessConfig
from fedgin.engine.checkpoint import load_checkpoint, save_checkpoint
from fedgin.engine.model import ModelConfig, build_model
from fedgin.synthetic import CT_DATASET, MRI_DATASET

# one torch thread: on a shared 2-core machine two spinning OpenMP threads stall each other
THREADS = "1"
TINY = ["--steps-per-epoch", "3", "--batch-size", "4", "--threads", THREADS]
ABDOMEN5 = ("liver", "kidneys", "spleen", "pancreas", "gallbladder")
ABDOMEN6 = ("liver", "kidney_right", "kidney_left", "spleen", "pancreas", "gallbladder")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``fedgin ARGS``; returns (exit code, stdout, stderr) and clears the capture."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedgin: error: ")
    assert "Traceback" not in err
    return lines[0]


def label_ids(organs: tuple[str, ...]) -> dict[str, int]:
    return {"background": 0, **{organ: i for i, organ in enumerate(organs, 1)}}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nifti(path: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine, img.get_data_dtype()


def resave(src: Path, dest: Path, affine: np.ndarray, transpose: tuple[int, int, int] | None = None) -> Path:
    """Write ``src``'s voxels (optionally transposed) under another affine."""
    data = np.asanyarray(nib.load(str(src)).dataobj)
    if transpose is not None:
        data = data.transpose(transpose)
    return write_volume(dest, data, affine, dtype=np.int16)


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(degrees)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


# --- shared phantom data and runs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> tuple[Path, Path]:
    """4 CT + 4 MRI phantom cases (split: 2 train, 1 val, 1 test each); MRI lacks pancreas and
    gallbladder annotations (``fedgin phantoms --mri-partial``)."""
    return phantom_datasets(4, 4, mri_partial=True)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, sites, cache_dir) -> Path:
    ct, mri = sites
    out = tmp_path_factory.mktemp("runs") / "local"
    rc = main(["train", "--site", f"ct={ct}", "--site", f"mri={mri}", "--mode", "local", "--out", str(out),
               "--epochs", "1", "--seed", "0", "--cache-dir", str(cache_dir), *TINY])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def central_run(tmp_path_factory, sites, cache_dir) -> Path:
    ct, mri = sites
    out = tmp_path_factory.mktemp("runs") / "central"
    rc = main(["train", "--site", f"ct={ct}", "--site", f"mri={mri}", "--mode", "centralized",
               "--out", str(out), "--epochs", "2", "--seed", "0", "--cache-dir", str(cache_dir),
               "--steps-per-epoch", "2", "--batch-size", "4", "--threads", THREADS])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def ct_model(local_run) -> Path:
    """The CT site's run dir: a model whose sites are all CT (predict can infer the modality)."""
    return local_run / "ct"


def check_run_dir(run: Path, *, sites: dict[str, str], epochs: int, seed: int) -> list[dict]:
    """The run-dir contract: config.json (settings, versions, seed), metrics.jsonl (one line per
    epoch per site), a checkpoint per epoch and last.pt. Returns the metrics lines."""
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == seed
    assert config["train"]["epochs"] == epochs
    assert {s["name"] for s in config["sites"]} == set(sites)
    for package in ("python", "torch", "monai", "flwr", "numpy", "nibabel", "fedgin"):
        assert config["versions"][package], package

    lines = read_jsonl(run / "metrics.jsonl")
    assert [(r["epoch"], r["site"]) for r in lines] == [(e, s) for e in range(1, epochs + 1) for s in sites]
    for r in lines:
        assert r["modality"] == sites[r["site"]]
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0
        assert isinstance(r["dice"], dict)
        assert isinstance(r["seconds"], float) and r["seconds"] > 0

    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted([f"epoch_{e:03d}.pt" for e in range(1, epochs + 1)] + ["last.pt"])
    last = load_checkpoint(run)
    assert last.meta["epoch"] == epochs and last.meta["seed"] == seed
    assert [s["name"] for s in last.sites] == list(sites)
    assert [s["modality"] for s in last.sites] == list(sites.values())
    assert last.scheme.name == "abdomen5" and last.model_config.out_channels == 6
    final = load_checkpoint(run / "checkpoints" / f"epoch_{epochs:03d}.pt")
    for key, value in last.state_dict.items():
        assert torch.equal(value, final.state_dict[key]), key
    return lines


# --- train --------------------------------------------------------------------------------------


def test_train_local_writes_one_run_dir_per_site(local_run):
    for site, modality in (("ct", "CT"), ("mri", "MRI")):
        lines = check_run_dir(local_run / site, sites={site: modality}, epochs=1, seed=0)
        # one validation case per site: Dice per organ of the scheme, null where never annotated
        dice = lines[0]["dice"]
        assert set(dice) == set(ABDOMEN5)
        annotated = ABDOMEN5 if modality == "CT" else ("liver", "kidneys", "spleen")
        for organ in ABDOMEN5:
            if organ in annotated:
                assert 0.0 <= dice[organ] <= 1.0
            else:
                assert dice[organ] is None
    assert not (local_run / "checkpoints" / "last.pt").exists()  # no pooled model in local mode


def test_train_centralized_writes_one_model_and_a_line_per_site(central_run):
    lines = check_run_dir(central_run, sites={"ct": "CT", "mri": "MRI"}, epochs=2, seed=0)
    # one model: both sites' lines of an epoch share the pooled training loss
    for epoch in (1, 2):
        losses = {r["loss"] for r in lines if r["epoch"] == epoch}
        assert len(losses) == 1
    assert not (central_run / "ct").exists() and not (central_run / "mri").exists()
    # per-site validation Dice of the pooled model: MRI never annotates pancreas/gallbladder
    mri = [r for r in lines if r["site"] == "mri"]
    assert all(r["dice"]["pancreas"] is None and r["dice"]["gallbladder"] is None for r in mri)


def test_train_refuses_an_existing_run_dir_without_resume(capsys, sites, ct_model, cache_dir):
    ct, _ = sites
    before = (ct_model / "metrics.jsonl").read_text()
    rc, _, err = cli(capsys, "train", "--site", f"ct={ct}", "--mode", "centralized", "--out", ct_model,
                     "--epochs", "1", "--cache-dir", cache_dir, *TINY)
    assert rc == 2
    assert "--resume" in one_error_line(err)
    assert (ct_model / "metrics.jsonl").read_text() == before


def test_resume_continues_from_last_checkpoint_and_equals_an_uninterrupted_run(capsys, tmp_path, sites,
                                                                               monkeypatch):
    """2 epochs straight == 2 epochs interrupted while epoch 2's checkpoint is written, then
    ``--resume`` alone (losses, Dice and weights exactly), under the default poly schedule: the
    resumed run takes every setting from its config.json, the schedule's length included."""
    ct, _ = sites
    common = ["train", "--site", f"ct={ct}", "--mode", "local", "--seed", "3", "--steps-per-epoch", "2",
              "--batch-size", "4", "--threads", THREADS, "--epochs", "2"]
    assert cli(capsys, *common, "--out", tmp_path / "straight")[0] == 0

    resumed = tmp_path / "resumed"
    real_save = fedgin.engine.runs.save_checkpoint

    def interrupted(path, *args, **kwargs):
        if Path(path).name == "epoch_002.pt":
            raise KeyboardInterrupt  # epoch 2's metrics line is written, its checkpoint is not
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(fedgin.engine.runs, "save_checkpoint", interrupted)
    assert cli(capsys, *common, "--out", resumed)[0] == 130
    monkeypatch.setattr(fedgin.engine.runs, "save_checkpoint", real_save)
    assert [r["epoch"] for r in read_jsonl(resumed / "ct" / "metrics.jsonl")] == [1, 2]
    assert load_checkpoint(resumed / "ct").meta["epoch"] == 1
    recorded = {p: p.read_bytes() for p in (resumed / "config.json", resumed / "ct" / "config.json")}

    rc, out, _ = cli(capsys, "train", "--out", resumed, "--resume")
    assert rc == 0
    assert "resuming" in out and "after epoch 1" in out
    assert {p: p.read_bytes() for p in recorded} == recorded  # the record is never rewritten

    straight_lines = check_run_dir(tmp_path / "straight" / "ct", sites={"ct": "CT"}, epochs=2, seed=3)
    resumed_lines = check_run_dir(resumed / "ct", sites={"ct": "CT"}, epochs=2, seed=3)
    keys = ("epoch", "site", "modality", "loss", "dice", "slices", "lr")
    assert [{k: r[k] for k in keys} for r in resumed_lines] == [{k: r[k] for k in keys} for r in straight_lines]
    assert resumed_lines[0]["lr"] > resumed_lines[1]["lr"]  # the poly schedule, over the recorded 2 epochs
    a = load_checkpoint(tmp_path / "straight" / "ct").state_dict
    b = load_checkpoint(resumed / "ct").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)

    # resuming a finished run trains nothing and changes nothing (the same options may be repeated)
    before = (resumed / "ct" / "metrics.jsonl").read_text()
    last_mtime = (resumed / "ct" / "checkpoints" / "last.pt").stat().st_mtime_ns
    rc, out, _ = cli(capsys, *common, "--out", resumed, "--resume")
    assert rc == 0 and "already done" in out
    assert (resumed / "ct" / "metrics.jsonl").read_text() == before
    assert (resumed / "ct" / "checkpoints" / "last.pt").stat().st_mtime_ns == last_mtime


@pytest.mark.parametrize("changed, named", [
    (["--epochs", "3"], "--epochs (recorded 2, now 3)"),
    (["--lr-schedule", "constant"], '--lr-schedule (recorded poly, now constant)'),
    (["--seed", "0", "--lr", "0.01"], "--seed (recorded 3, now 0), --lr (recorded 0.001, now 0.01)"),
    (["--mode", "centralized"], "--mode (recorded local, now centralized)"),
    (["--no-gin"], "--gin/--no-gin (recorded true, now false)"),
])
def test_train_resume_refuses_a_changed_setting_in_one_line(capsys, tmp_path, sites, cache_dir, changed, named):
    """Every option that would change what a resumed run computes is refused, each named with its
    recorded and its new value; nothing is written (the recorded run needs no training: the
    refusal comes before any)."""
    from fedgin.config import SiteSpec, resolve
    from fedgin.engine.runs import load_sites, with_site_facts

    ct, _ = sites
    run = tmp_path / "run"
    (run / "ct" / "checkpoints").mkdir(parents=True)
    args = ["train", "--site", f"ct={ct}", "--mode", "local", "--seed", "3", "--epochs", "2", "--out", run,
            "--cache-dir", cache_dir]
    cfg = resolve("quick", command="train", out=str(run), sites=(SiteSpec("ct", str(ct)),), seed=3, mode="local",
                  train_overrides={"epochs": 2}, cache_dir=str(cache_dir))
    cfg = with_site_facts(cfg, load_sites(cfg))
    cfg.write(run / "config.json")
    before = (run / "config.json").read_bytes()
    rc, _, err = cli(capsys, *args, "--resume", *changed)
    assert rc == 2
    line = one_error_line(err)
    assert "recorded configuration (config.json)" in line and named in line, line
    assert (run / "config.json").read_bytes() == before
    assert not (run / "ct" / "config.json").exists() and not (run / "ct" / "metrics.jsonl").exists()


def test_train_resume_of_a_federated_run_names_the_command(capsys, tmp_path):
    from fedgin.config import SiteSpec, resolve

    run = tmp_path / "run"
    run.mkdir()
    resolve("quick", command="federate", out=str(run), sites=(SiteSpec("ct", "/nowhere"),)).write(run / "config.json")
    rc, _, err = cli(capsys, "train", "--out", run, "--resume")
    assert rc == 2
    assert one_error_line(err) == f"fedgin: error: {run} is a federated run: resume it with fedgin federate --resume"
    rc, _, err = cli(capsys, "train", "--out", tmp_path / "new", "--resume")  # nothing recorded: a new run
    assert rc == 2 and "the following arguments are required: --site, --mode" in one_error_line(err)


def test_resume_before_the_first_checkpoint_logs_each_epoch_once(capsys, tmp_path, sites):
    ct, _ = sites
    common = ["train", "--site", f"ct={ct}", "--mode", "local", "--out", tmp_path / "run", "--epochs", "1",
              "--steps-per-epoch", "1", "--batch-size", "4", "--threads", THREADS]
    assert cli(capsys, *common)[0] == 0
    for checkpoint in (tmp_path / "run" / "ct" / "checkpoints").iterdir():
        checkpoint.unlink()  # died after the metrics line of epoch 1, before its checkpoint
    assert cli(capsys, *common, "--resume")[0] == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "run" / "ct" / "metrics.jsonl")] == [1]


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_writes_summary_csv_and_markdown(capsys, tmp_path, sites, ct_model, cache_dir):
    ct, mri = sites
    out = tmp_path / "eval"
    rc, stdout, _ = cli(capsys, "evaluate", "--model", ct_model, "--data", ct, mri, "--out", out,
                        "--cache-dir", cache_dir)
    assert rc == 0
    assert "CT: mean Dice" in stdout and "MRI: mean Dice" in stdout

    summary = json.loads((out / "summary.json").read_text())
    cases = summary["metric_per_case"]
    # the seeded test split: one test case per dataset
    assert sorted((c["dataset"], c["modality"]) for c in cases) == [(CT_DATASET, "CT"), (MRI_DATASET, "MRI")]
    for case in cases:
        assert set(case["metrics"]) == set(ABDOMEN5)
        for organ, m in case["metrics"].items():
            if organ in case["annotated"]:
                assert m["dice"] is None or 0.0 <= m["dice"] <= 1.0
                assert m["hd95"] is None or m["hd95"] >= 0.0
            else:
                assert m == {"dice": None, "hd95": None, "missed": None, "false_positive": None}
    mri_case = next(c for c in cases if c["modality"] == "MRI")
    assert set(mri_case["annotated"]) == {"liver", "kidneys", "spleen"}
    assert mri_case["metrics"]["pancreas"] == {"dice": None, "hd95": None, "missed": None, "false_positive": None}
    assert mri_case["metrics"]["gallbladder"] == {"dice": None, "hd95": None, "missed": None, "false_positive": None}

    by_modality = summary["by_modality"]
    assert {"CT", "MRI"} <= set(by_modality)
    assert by_modality["CT"]["cases"] == 1 and by_modality["MRI"]["cases"] == 1
    for organ in ("pancreas", "gallbladder"):
        assert by_modality["MRI"][organ]["dice"] == {"mean": None, "sd": None, "n": 0}
    assert by_modality["CT"]["liver"]["dice"]["n"] == 1
    assert summary["scheme"]["name"] == "abdomen5"

    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(cases) * len(ABDOMEN5)
    assert {(r["case"], r["organ"]) for r in rows} == {(c["case"], o) for c in cases for o in ABDOMEN5}
    for r in rows:
        if r["modality"] == "MRI" and r["organ"] in ("pancreas", "gallbladder"):
            assert r["annotated"] == "False" and r["dice"] == "" and r["hd95"] == ""
            assert r["missed"] == "" and r["false_positive"] == ""

    markdown = (out / "summary.md").read_text()
    assert "## CT (1 cases)" in markdown and "## MRI (1 cases)" in markdown
    assert "| pancreas | - | - | 0 | 0 | 0 |" in markdown  # under MRI
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_evaluate_scores_a_perfect_prediction_as_dice_1_and_hd95_0(capsys, tmp_path, make_nnunet, monkeypatch):
    """The Dice/HD95 pipeline with the prediction replaced by the reference label itself."""
    ct = make_nnunet("Dataset011_CT", cases={
        "full": None,  # every organ painted
        "no_gallbladder": {"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4, "pancreas": 5},
    })
    mri = make_nnunet("Dataset012_MR", modality="MRI", cases={"partial": None},
                      manifest={"partial": ["liver", "kidney_right", "kidney_left", "spleen"]})
    model = tmp_path / "model.pt"
    scheme = get_scheme("abdomen5")
    save_checkpoint(model, build_model(ModelConfig(out_channels=6)).state_dict(), model_config=ModelConfig(),
                    scheme=scheme, preprocess=PreprocessConfig(), sites=[], meta={"epoch": 0})

    # evaluate reads the reference, preprocesses and predicts; the prediction becomes the reference
    monkeypatch.setattr(fedgin.evaluation.scoring, "load_case", lambda ref, scheme, cfg, cache_dir, **_: (ref, scheme))
    monkeypatch.setattr(fedgin.evaluation.scoring, "predict_labels", lambda model, pre, device, compile=False: pre[0].read(pre[1])[1])
    out = tmp_path / "eval"
    rc, _, _ = cli(capsys, "evaluate", "--model", model, "--data", ct, mri, "--out", out, "--cases", "all")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    per_case = {c["case"]: c["metrics"] for c in summary["metric_per_case"]}
    assert set(per_case) == {"full", "no_gallbladder", "partial"}
    for organ in ABDOMEN5:
        assert per_case["full"][organ] == {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}, organ
    assert per_case["no_gallbladder"]["gallbladder"] == {"dice": None, "hd95": None, "missed": False, "false_positive": False}  # absent from both
    assert per_case["no_gallbladder"]["pancreas"] == {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}
    assert per_case["partial"]["liver"] == {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}
    assert per_case["partial"]["kidneys"] == {"dice": 1.0, "hd95": 0.0, "missed": False, "false_positive": False}
    assert per_case["partial"]["pancreas"] == {"dice": None, "hd95": None, "missed": None, "false_positive": None}  # not annotated
    by = summary["by_modality"]
    assert by["CT"]["mean_dice"] == 1.0 and by["MRI"]["mean_dice"] == 1.0
    assert by["CT"]["gallbladder"]["dice"] == {"mean": 1.0, "sd": 0.0, "n": 1}
    assert by["CT"]["liver"]["hd95"] == {"mean": 0.0, "sd": 0.0, "n": 2}
    assert by["MRI"]["pancreas"]["dice"]["n"] == 0


def test_evaluate_uses_the_test_split_of_the_training_seed(capsys, tmp_path, make_nnunet):
    from fedgin.data.splits import seeded_split

    ids = [f"case_{i:03d}" for i in range(8)]
    data = make_nnunet("Dataset013_CT", cases=ids)
    model = save_checkpoint(tmp_path / "model.pt", build_model(ModelConfig()).state_dict(), model_config=ModelConfig(),
                            scheme=get_scheme("abdomen5"), preprocess=PreprocessConfig(),
                            sites=[{"name": "ct", "modality": "CT"}], meta={"epoch": 1, "seed": 3})
    assert set(seeded_split(ids, 0).test) & set(seeded_split(ids, 3).train)  # the seeds' splits overlap
    rc, _, err = cli(capsys, "evaluate", "--model", model, "--data", data, "--out", tmp_path / "eval")
    assert rc == 0, err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["metric_per_case"]) == list(seeded_split(ids, 3).test)


def test_a_dataset_named_like_the_shipped_bundle_gets_a_seeded_split_and_the_run_records_it(capsys, tmp_path,
                                                                                             make_nnunet):
    """A user's own ``Dataset802_AbdomenMR`` shares only its name with the shipped split file: it
    trains on a seeded split instead of stopping with "unknown case ids", and ``config.json`` says
    which split each site used."""
    ids = [f"patient_{i:03d}" for i in range(5)]
    data = make_nnunet("Dataset802_AbdomenMR", cases=ids, modality="MRI")
    rc, _, err = cli(capsys, "train", "--mode", "local", "--site", f"mri={data}", "--out", tmp_path / "run",
                     "--epochs", "1", *TINY)
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["sites"][0]["split"] == "seeded (seed 0)" and config["sites"][0]["modality"] == "MRI"
    assert json.loads((tmp_path / "run" / "mri" / "config.json").read_text())["sites"][0]["split"] == "seeded (seed 0)"


# --- predict ------------------------------------------------------------------------------------


def assert_same_grid(output: Path, source: Path) -> np.ndarray:
    data, affine, dtype = nifti(output)
    src = nib.load(str(source))
    assert data.shape == src.shape
    assert np.array_equal(affine, src.affine)
    assert dtype == np.uint8 and data.dtype == np.uint8
    return data


def test_predict_single_file_keeps_the_input_grid(capsys, tmp_path, sites, ct_model):
    ct, _ = sites
    src = ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    assert axcodes_of(nib.load(str(src)).affine) == "LPS"
    out = tmp_path / "pred"
    rc, stdout, _ = cli(capsys, "predict", "-i", src, "-o", out, "--model", ct_model)
    assert rc == 0, stdout
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "phantom_ct_000.nii.gz", "provenance.json",
                                                     "qa.html", "qa.npz"]
    labels = assert_same_grid(out / "phantom_ct_000.nii.gz", src)
    assert set(np.unique(labels)) <= set(range(6))
    assert json.loads((out / "labels.json").read_text()) == label_ids(ABDOMEN5)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["scheme"]["name"] == "abdomen5"
    assert prov["model"] == str(ct_model / "checkpoints" / "last.pt")
    assert prov["arguments"]["modality"] == "CT"  # from the dataset.json above imagesTr
    assert prov["inputs"] == [str(src)]
    assert prov["versions"]["torch"] and prov["preprocess"]["slice_size"] == [128, 128]


def test_predict_folder_keeps_lps_anisotropic_and_oblique_grids(capsys, tmp_path, sites, ct_model):
    ct, _ = sites
    src = ct / "imagesTr" / "phantom_ct_001_0000.nii.gz"
    original = nib.load(str(src))
    lps = original.affine
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(src, inputs / "lps_0000.nii.gz")
    aniso = np.diag([-0.9, -1.7, 3.0, 1.0])
    aniso[:3, 3] = [80.0, 120.0, -40.0]
    resave(src, inputs / "aniso_0000.nii.gz", aniso)
    oblique = np.eye(4)
    oblique[:3, :3] = rotation([1.0, 0.4, 0.3], 25.0) @ np.diag([-1.3, -2.2, 4.0])
    oblique[:3, 3] = [90.0, 150.0, 20.0]
    resave(src, inputs / "oblique_0000.nii.gz", oblique)
    # the same voxels with permuted axes (slices along the first voxel axis) and matching affine
    permuted = lps.copy()
    permuted[:, :3] = lps[:, [2, 0, 1]]
    resave(src, inputs / "permuted_0000.nii.gz", permuted, transpose=(2, 0, 1))
    assert axcodes_of(nib.load(str(inputs / "oblique_0000.nii.gz")).affine) != "RAS"
    out = tmp_path / "pred"

    rc, stdout, err = cli(capsys, "predict", "-i", inputs, "-o", out, "--model", ct_model, "--masks")
    assert rc == 0, err
    cases = ("aniso", "lps", "oblique", "permuted")
    expected = {"labels.json", "provenance.json", "qa.html", "qa.npz"}
    for case in cases:
        expected |= {f"{case}.nii.gz"} | {f"{case}_{organ}.nii.gz" for organ in ABDOMEN5}
    assert {p.name for p in out.iterdir()} == expected
    predictions = {}
    for case in cases:
        labels = assert_same_grid(out / f"{case}.nii.gz", inputs / f"{case}_0000.nii.gz")
        predictions[case] = labels
        for idx, organ in enumerate(ABDOMEN5, 1):
            mask = assert_same_grid(out / f"{case}_{organ}.nii.gz", inputs / f"{case}_0000.nii.gz")
            assert set(np.unique(mask)) <= {0, 1}
            assert np.array_equal(mask == 1, labels == idx), (case, organ)
    # reorientation is exact: permuting the input's axes permutes the prediction
    assert np.array_equal(predictions["permuted"], predictions["lps"].transpose(2, 0, 1))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["arguments"]["masks"] is True and prov["arguments"]["modality"] == "CT"  # from the sites
    assert len(prov["inputs"]) == 4


def test_predict_outputs_are_readable_like_ordinary_files(capsys, tmp_path, sites, ct_model):
    ct, _ = sites
    out = tmp_path / "pred"
    assert cli(capsys, "predict", "-i", ct / "imagesTr" / "phantom_ct_000_0000.nii.gz", "-o", out,
               "--model", ct_model)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    # staged under temporary names, yet published with the umask's mode as any ordinary file
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_predict_needs_modality_when_it_cannot_be_told(capsys, tmp_path, sites, central_run):
    ct, _ = sites
    src = shutil.copy(ct / "imagesTr" / "phantom_ct_000_0000.nii.gz", tmp_path / "scan_0000.nii.gz")
    out = tmp_path / "pred"
    # the pooled model saw CT and MRI sites and no dataset.json sits beside the input
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", out, "--model", central_run)
    assert rc == 2
    assert "--modality" in one_error_line(err)
    assert not out.exists()
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", out, "--model", central_run, "--modality", "CT")
    assert rc == 0, err
    assert_same_grid(out / "scan.nii.gz", Path(src))


@pytest.mark.parametrize("seed", [
    0,  # UnpicklingError
    17,  # IndexError inside torch's weights-only unpickler
    62,  # KeyError inside torch's weights-only unpickler
])
def test_predict_refuses_a_corrupt_checkpoint(capsys, tmp_path, sites, seed):
    ct, _ = sites
    model = tmp_path / "model.pt"
    model.write_bytes(np.random.default_rng(seed).bytes(4096))  # random bytes
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", ct / "imagesTr" / "phantom_ct_000_0000.nii.gz", "-o", out,
                     "--model", model)
    assert rc == 2
    line = one_error_line(err)
    assert str(model) in line and "damaged or not a fedgin checkpoint" in line
    assert not out.exists()


def test_predict_with_an_abdomen6_checkpoint_writes_7_labels(capsys, tmp_path, sites):
    """The scheme travels in the checkpoint: 7 labels out, kidneys apart, label 6 written as 6."""
    ct, _ = sites
    scheme = get_scheme("abdomen6")
    cfg = ModelConfig(out_channels=scheme.num_classes)
    torch.manual_seed(0)
    net = build_model(cfg)
    state = net.state_dict()
    state["model.2.1.conv.unit0.conv.bias"][:] = torch.tensor([0, 0, 0, 0, 0, 0, 100.0])  # -> gallbladder
    model = save_checkpoint(tmp_path / "abdomen6.pt", state, model_config=cfg, scheme=scheme,
                            preprocess=PreprocessConfig(), sites=[{"name": "ct", "modality": "CT"}],
                            meta={"epoch": 1})
    src = ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", out, "--model", model, "--masks")
    assert rc == 0, err
    assert json.loads((out / "labels.json").read_text()) == label_ids(ABDOMEN6)
    labels = assert_same_grid(out / "phantom_ct_000.nii.gz", src)
    assert labels.max() == 6 and set(np.unique(labels)) <= set(range(7))
    assert {p.name for p in out.iterdir()} == {"labels.json", "provenance.json", "phantom_ct_000.nii.gz", "qa.html", "qa.npz"} | {
        f"phantom_ct_000_{o}.nii.gz" for o in ABDOMEN6}
    assert json.loads((out / "provenance.json").read_text())["scheme"]["name"] == "abdomen6"


def _truncated_copy(src: Path, dest: Path) -> Path:
    """A NIfTI whose header reads but whose voxel data stops half way."""
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "existing-output"])
def test_predict_writes_nothing_when_a_later_input_fails(capsys, tmp_path, sites, ct_model, existing):
    ct, _ = sites
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    shutil.copy(good, inputs / "a_0000.nii.gz")
    _truncated_copy(good, inputs / "b_0000.nii.gz")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    out = tmp_path / "pred"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", out, "--model", ct_model, "--masks")
    assert rc == 2
    assert "b_0000.nii.gz" in one_error_line(err)
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]  # no outputs, no staging folder
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # inputs untouched


def test_predict_refuses_two_inputs_with_one_output_name(capsys, tmp_path, sites, ct_model):
    ct, _ = sites
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(ct / "imagesTr" / "phantom_ct_000_0000.nii.gz", inputs / "scan_0000.nii.gz")
    shutil.copy(ct / "imagesTr" / "phantom_ct_001_0000.nii.gz", inputs / "scan.nii.gz")
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", out, "--model", ct_model)
    assert rc == 2
    assert "scan" in one_error_line(err)
    assert not out.exists()


def _with_header(src: Path, dest: Path, *, qform_code: int, sform_code: int) -> Path:
    """``src``'s voxels under a header with its own qform and sform codes, a qform that differs
    from the sform by a shift, mm + sec units, a TR and a descrip."""
    original = nib.load(str(src))
    img = nib.Nifti1Image(np.asanyarray(original.dataobj), original.affine)
    qform = original.affine.copy()
    qform[:3, 3] += (1.5, -2.0, 0.5)
    img.set_qform(qform, code=qform_code)
    img.set_sform(original.affine, code=sform_code)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 2.5
    img.header["descrip"] = b"scanner 7 protocol abdomen"
    img.header["cal_min"], img.header["cal_max"] = -125, 275
    nib.save(img, str(dest))
    return dest


def test_predict_writes_the_inputs_header_through(capsys, tmp_path, sites, ct_model):
    """qform and sform codes and matrices, units, pixdim and descrip of the input, in the label map
    and in every mask; uint8 without scaling; an input without sform keeps sform_code 0."""
    ct, _ = sites
    src = ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _with_header(src, inputs / "talairach_0000.nii.gz", qform_code=2, sform_code=4)
    _with_header(src, inputs / "qonly_0000.nii.gz", qform_code=1, sform_code=0)
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", out, "--model", ct_model, "--masks")
    assert rc == 0, err
    for case, codes in (("talairach", (2, 4)), ("qonly", (1, 0))):
        source = nib.load(str(inputs / f"{case}_0000.nii.gz")).header
        for name in [f"{case}.nii.gz"] + [f"{case}_{organ}.nii.gz" for organ in ABDOMEN5]:
            img = nib.load(str(out / name))
            hdr = img.header
            assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == codes, name
            assert np.array_equal(hdr.get_qform(), source.get_qform()), name
            assert np.array_equal(hdr.get_sform(), source.get_sform()), name
            assert np.array_equal(img.affine, nib.load(str(inputs / f"{case}_0000.nii.gz")).affine), name
            assert hdr.get_xyzt_units() == ("mm", "sec"), name
            assert np.array_equal(hdr["pixdim"][:5], source["pixdim"][:5]), name
            assert hdr["descrip"].item().startswith(b"fedgin "), name
            assert hdr["descrip"].item().endswith(b"; scanner 7 protocol abdomen"), name
            assert img.get_data_dtype() == np.uint8 and (hdr["cal_min"], hdr["cal_max"]) == (0, 0), name
            assert all(np.isnan(v) or v == d for v, d in zip((hdr["scl_slope"], hdr["scl_inter"]), (1, 0))), name
        assert nib.load(str(out / f"{case}.nii.gz")).header["descrip"].item().startswith(b"fedgin label map; ")


def _saved_probabilities(path: Path) -> tuple[np.ndarray, list[str]]:
    with np.load(path) as npz:  # no pickle needed
        assert sorted(npz.files) == ["labels", "probabilities"]
        return npz["probabilities"], list(npz["labels"])


def test_predict_saves_probabilities_on_the_input_grid(capsys, tmp_path, sites, ct_model):
    """``{case}.npz``: C x X x Y x Z float16 in the input's axis order; its argmax is the label map
    before post-processing, and saving it changes no label."""
    ct, _ = sites
    src = ct / "imagesTr" / "phantom_ct_001_0000.nii.gz"
    lps = nib.load(str(src)).affine
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(src, inputs / "lps_0000.nii.gz")
    permuted = lps.copy()
    permuted[:, :3] = lps[:, [2, 0, 1]]
    resave(src, inputs / "permuted_0000.nii.gz", permuted, transpose=(2, 0, 1))
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", tmp_path / "probs", "--model", ct_model,
                     "--save-probabilities")
    assert rc == 0, err
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", tmp_path / "raw", "--model", ct_model,
                     "--no-postprocess")
    assert rc == 0, err
    rc, _, err = cli(capsys, "predict", "-i", inputs, "-o", tmp_path / "raw-probs", "--model", ct_model,
                     "--no-postprocess", "--save-probabilities")
    assert rc == 0, err
    assert {p.name for p in (tmp_path / "probs").iterdir()} == {
        "labels.json", "provenance.json", "lps.nii.gz", "lps.npz", "permuted.nii.gz", "permuted.npz", "qa.html", "qa.npz"}
    assert not any(p.suffix == ".npz" and p.name != "qa.npz" for p in (tmp_path / "raw").iterdir())
    assert json.loads((tmp_path / "probs" / "provenance.json").read_text())["arguments"]["save_probabilities"]
    for case in ("lps", "permuted"):
        shape = nib.load(str(inputs / f"{case}_0000.nii.gz")).shape
        probabilities, labels = _saved_probabilities(tmp_path / "probs" / f"{case}.npz")
        assert labels == ["background", *ABDOMEN5]
        assert probabilities.dtype == np.float16 and probabilities.shape == (6, *shape)
        assert np.allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)
        raw, _, _ = nifti(tmp_path / "raw" / f"{case}.nii.gz")
        assert np.array_equal(probabilities.argmax(0), raw), case
        assert np.array_equal(nifti(tmp_path / "raw-probs" / f"{case}.nii.gz")[0], raw), case
        raw_probabilities, _ = _saved_probabilities(tmp_path / "raw-probs" / f"{case}.npz")
        assert np.array_equal(raw_probabilities, probabilities)  # saved before post-processing
    lps_probs, _ = _saved_probabilities(tmp_path / "probs" / "lps.npz")
    permuted_probs, _ = _saved_probabilities(tmp_path / "probs" / "permuted.npz")
    assert np.array_equal(permuted_probs, lps_probs.transpose(0, 3, 1, 2))  # the input's axis order


def test_predict_picks_a_checkpoint_of_the_run_dir(capsys, tmp_path, sites, central_run):
    ct, _ = sites
    src = ct / "imagesTr" / "phantom_ct_000_0000.nii.gz"
    out = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", out, "--model", central_run, "--checkpoint", "epoch_1")
    assert rc == 0, err
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"] == prov["checkpoint"]["file"] == str(central_run / "checkpoints" / "epoch_001.pt")
    assert prov["checkpoint"]["epoch"] == 1 and len(prov["checkpoint"]["sha256"]) == 64
    assert prov["arguments"]["checkpoint"] == "epoch_1" and prov["arguments"]["model"] == str(central_run)
    assert_same_grid(out / "phantom_ct_000.nii.gz", src)
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", tmp_path / "last", "--model", central_run)
    assert rc == 0, err
    last = json.loads((tmp_path / "last" / "provenance.json").read_text())
    assert last["checkpoint"]["file"] == str(central_run / "checkpoints" / "last.pt")
    assert last["checkpoint"]["epoch"] == 2 and last["arguments"]["checkpoint"] is None
    for name, kind in (("epoch_7", "epoch_007"), ("round_1", "round_001")):
        rc, _, err = cli(capsys, "predict", "-i", src, "-o", tmp_path / name, "--model", central_run,
                         "--checkpoint", name)
        assert rc == 2
        assert one_error_line(err) == (f"fedgin: error: {central_run}: no checkpoint {kind} in this run dir "
                                       f"(it has: last, epoch_001..epoch_002)")
        assert not (tmp_path / name).exists()


# --- the real bundle ------------------------------------------------------------------------------


def test_real_data_train_evaluate_predict(capsys, tmp_path, shared_data):
    mr = shared_data / "Dataset802_AbdomenMR"
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--site", f"mri={mr}", "--mode", "local", "--out", run, "--epochs", "1",
                     "--steps-per-epoch", "2", "--batch-size", "4", "--threads", THREADS)
    assert rc == 0, err
    lines = check_run_dir(run / "mri", sites={"mri": "MRI"}, epochs=1, seed=0)
    assert lines[0]["slices"] == 8

    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--model", run / "mri", "--data", mr, "--out", out)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    # the shipped split: 4 CHAOS MRI test patients, which annotate no pancreas or gallbladder
    assert sorted(c["case"] for c in summary["metric_per_case"]) == [
        "chaos_t2_20", "chaos_t2_21", "chaos_t2_22", "chaos_t2_31"]
    assert summary["by_modality"]["MRI"]["cases"] == 4
    assert summary["by_modality"]["MRI"]["pancreas"]["dice"]["n"] == 0

    src = mr / "imagesTr" / "chaos_t2_20_0000.nii.gz"
    pred = tmp_path / "pred"
    rc, _, err = cli(capsys, "predict", "-i", src, "-o", pred, "--model", run / "mri")
    assert rc == 0, err
    assert_same_grid(pred / "chaos_t2_20.nii.gz", src)
