"""``--label-map NAME=ORGAN|background``: labels fedgin does not know, mapped by the user, through
``fedgin data check``, ``train``, ``federate`` (its site loading) and ``evaluate``, on real NIfTI
datasets written to ``tmp_path``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import ABDOMEN_LABELS, SHAPE, phantom_case, write_nnunet
from test_bad_input import assert_line, make_checkpoint, refused
from fedgin.cli import main
from fedgin.config import RunConfig, SiteSpec, resolve
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme, parse_label_map
from fedgin.data.nifti import write_volume
from fedgin.engine.checkpoint import load_raw
from fedgin.errors import FedginError
from fedgin.federated.task import run_config_from_json, run_config_to_json, site_data

ABDOMEN5 = get_scheme("abdomen5")
ABDOMEN6 = get_scheme("abdomen6")
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
TINY = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2", "--threads", "1"]
# the stomach's box stands in for a tumour: MSD-style "cancer" label, id 9
CANCER_LABELS = {**ABDOMEN_LABELS, "cancer": 9}
CANCER_CASES = {"case_000": {"liver": 1, "spleen": 4, "stomach": 9}, "case_001": {"liver": 1, "stomach": 9},
                "case_002": {"liver": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 9}}


def expected(ids: dict[str, int]) -> np.ndarray:
    return phantom_case(SHAPE, organs=ids)[1]


def cancer_dataset(tmp_path: Path) -> Path:
    return write_nnunet(tmp_path / "Dataset101_Cancer", CANCER_CASES, labels=CANCER_LABELS)


# --- parsing -----------------------------------------------------------------------------------


def test_parse_label_map_normalises_names_and_checks_organs():
    assert parse_label_map(["Cancer=background", "leber=Liver", "nieren=kidneys"]) == \
        {"cancer": "background", "leber": "liver", "nieren": "kidneys"}
    assert parse_label_map(None) is None and parse_label_map([]) is None
    assert parse_label_map(["x=liver", "X=liver"]) == {"x": "liver"}  # the same entry twice is fine
    for entry, problem in [("cancer", "takes NAME=ORGAN or NAME=background, got 'cancer'"),
                           ("=liver", "takes NAME=ORGAN or NAME=background"),
                           ("cancer=lever", "unknown organ 'lever'; expected background or one of liver"),
                           ("background=liver", "cannot remap 'background'")]:
        with pytest.raises(FedginError, match=problem):
            parse_label_map([entry])
    with pytest.raises(FedginError, match=r"maps 'Cancer' twice \(background and liver\)"):
        parse_label_map(["cancer=background", "Cancer=liver"])


# --- datasets ----------------------------------------------------------------------------------


def test_an_unknown_label_mapped_to_background_becomes_background(tmp_path):
    root = cancer_dataset(tmp_path)
    with pytest.raises(FedginError, match=r"label 'cancer' \(id 9\) has no mapping to scheme abdomen5"):
        open_dataset(root, ABDOMEN5)

    dataset = open_dataset(root, ABDOMEN5, label_map={"CANCER": "background"})  # any case
    case = dataset.case("case_000")
    _, label, _ = case.read(ABDOMEN5)
    assert np.array_equal(label, expected({"liver": 1, "spleen": 3}))  # the tumour voxels are background
    assert case.annotated == ABDOMEN5.organs  # the other labels keep their meaning
    assert "cancer" in dataset.label_names


def test_a_renamed_organ_maps_to_that_organ_and_is_annotated(make_nnunet):
    labels = {"background": 0, "leber": 1, "Milz": 2, "stomach": 3}
    root = make_nnunet(cases={"a": {"liver": 1, "spleen": 2, "stomach": 3}}, labels=labels,
                       manifest={"a": ["leber", "Milz"]})
    case = open_dataset(root, ABDOMEN6, label_map={"leber": "liver", "milz": "spleen"}).cases[0]
    assert case.annotated == ("liver", "spleen")  # the manifest's names go through the map too
    _, label, _ = case.read(ABDOMEN6)
    assert np.array_equal(label, expected({"liver": 1, "spleen": 4}))


def test_the_map_overrides_fedgins_own_alias_table(make_nnunet):
    """A site whose 'liver' label is really liver plus tumour can be dropped, or 'stomach' kept."""
    root = make_nnunet(cases={"a": {"liver": 1, "spleen": 4, "stomach": 9}}, labels={**ABDOMEN_LABELS, "stomach": 9})
    case = open_dataset(root, ABDOMEN5, label_map={"liver": "background", "stomach": "pancreas"}).cases[0]
    _, label, _ = case.read(ABDOMEN5)
    assert np.array_equal(label, expected({"spleen": 3, "stomach": 4}))
    assert "liver" not in case.annotated and "pancreas" in case.annotated


def test_a_label_mapped_to_both_kidneys_is_refused_by_abdomen6(make_nnunet):
    root = make_nnunet(cases={"a": {"liver": 1, "kidney_left": 2, "kidney_right": 2}},
                       labels={"background": 0, "liver": 1, "nieren": 2})
    assert open_dataset(root, ABDOMEN5, label_map={"nieren": "kidneys"}).cases[0].annotated == ("liver", "kidneys")
    with pytest.raises(FedginError, match=r"label 'nieren' \(id 2\) merges kidney_left, kidney_right"):
        open_dataset(root, ABDOMEN6, label_map={"nieren": "kidneys"})


def test_totalsegmentator_masks_are_mapped_by_structure_name(tmp_path):
    subject = tmp_path / "ts" / "s0001"
    image, _ = phantom_case(SHAPE, organs={"liver": 1, "spleen": 1})
    write_volume(subject / "ct.nii.gz", image, AFFINE)
    write_volume(subject / "segmentations" / "liver_and_tumour.nii.gz", expected({"liver": 1}), AFFINE)
    write_volume(subject / "segmentations" / "spleen.nii.gz", expected({"spleen": 1}), AFFINE)

    plain = open_dataset(tmp_path / "ts", ABDOMEN5).cases[0]
    assert plain.annotated == ("spleen",)
    dataset = open_dataset(tmp_path / "ts", ABDOMEN5, label_map={"liver_and_tumour": "liver"})
    case = dataset.cases[0]
    assert case.annotated == ("liver", "spleen")
    assert np.array_equal(case.read(ABDOMEN5)[1], expected({"liver": 1, "spleen": 3}))
    assert set(dataset.label_names) == {"liver_and_tumour", "spleen"}
    # mapped to background: the mask is not read, so its organ is not annotated
    dropped = open_dataset(tmp_path / "ts", ABDOMEN5, label_map={"liver_and_tumour": "liver", "spleen": "background"})
    assert dropped.cases[0].annotated == ("liver",)
    assert np.array_equal(dropped.cases[0].read(ABDOMEN5)[1], expected({"liver": 1}))


# --- commands ----------------------------------------------------------------------------------


def test_data_check_fails_without_the_map_and_passes_with_it(tmp_path, capsys):
    root = cancer_dataset(tmp_path)
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 2
    err = capsys.readouterr().err
    assert_line(err.strip(), root / "dataset.json", r"label 'cancer' \(id 9\) has no mapping to scheme abdomen5 "
                                                    r"\(--label-map cancer=ORGAN\|background maps it\)")

    assert main(["data", "check", str(root), "--label-map", "cancer=background"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines()[-1] == "OK: 3 cases in 1 dataset(s) (CT), all readable and mapped"


def test_data_check_names_a_label_map_name_no_dataset_has(tmp_path, capsys):
    root = cancer_dataset(tmp_path)
    capsys.readouterr()
    assert main(["data", "check", str(root), "--label-map", "cancer=background", "--label-map", "cancr=liver"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fedgin: error: --label-map cancr: no dataset has a label named 'cancr' "
                             "(labels: cancer, gallbladder,")


def test_train_with_the_map_records_it_and_evaluate_reuses_it(tmp_path, capsys):
    root = cancer_dataset(tmp_path)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--mode", "centralized", "--site", f"ct={root}", "--out", str(run), *TINY,
                 "--label-map", "Cancer=background"]) == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    assert config["label_map"] == {"cancer": "background"}
    assert RunConfig.from_dict(config).label_map == {"cancer": "background"}
    assert load_raw(run / "checkpoints" / "last.pt")["meta"]["label_map"] == {"cancer": "background"}

    # the model's recorded map is evaluate's default: no --label-map needed
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(root), "--out", str(out), "--cases", "all"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arguments"]["label_map"] == {"cancer": "background"}
    assert {c["case"] for c in summary["metric_per_case"]} == set(CANCER_CASES)


def test_an_older_checkpoint_without_a_map_needs_the_map_on_evaluate(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model.pt")  # meta without "label_map", as before this option
    root = cancer_dataset(tmp_path)
    line = refused(capsys, ["evaluate", "--model", model, "--data", root, "--out", tmp_path / "eval",
                            "--cases", "all"], [tmp_path])
    assert "label 'cancer' (id 9) has no mapping" in line
    assert main(["evaluate", "--model", str(model), "--data", str(root), "--out", str(tmp_path / "eval"),
                 "--cases", "all", "--label-map", "cancer=background"]) == 0


@pytest.mark.parametrize(("entries", "problem"), [
    (["cancer=background", "cancr=liver"],
     r"--label-map cancr: no dataset has a label named 'cancr' \(labels: cancer, .*\)"),
    (["cancer=lever"], r"--label-map cancer=lever: unknown organ 'lever'; expected background or one of .*"),
    (["cancer"], r"--label-map takes NAME=ORGAN or NAME=background, got 'cancer'"),
])
@pytest.mark.parametrize("command", ["train", "federate", "evaluate"])
def test_a_bad_label_map_is_one_error_line_and_writes_nothing(command, entries, problem, tmp_path, capsys):
    root = cancer_dataset(tmp_path)
    out = tmp_path / "out"
    if command == "evaluate":
        model = make_checkpoint(tmp_path / "model.pt")
        argv = ["evaluate", "--model", model, "--data", root, "--out", out, "--cases", "all"]
    else:
        argv = [command, "--site", f"ct={root}", "--out", out, *TINY[2:]]
        argv += ["--mode", "local", "--epochs", "1"] if command == "train" else ["--rounds", "1"]
    line = refused(capsys, [*argv, *[a for e in entries for a in ("--label-map", e)]], [tmp_path])
    assert re.fullmatch(f"fedgin: error: {problem}", line), line
    assert not out.exists()


def test_a_federated_site_opens_its_dataset_with_the_runs_map(tmp_path):
    """The map travels in the RunConfig JSON that Flower hands every ClientApp."""
    root = cancer_dataset(tmp_path)
    cfg = resolve("quick", command="federate", out=str(tmp_path / "run"), sites=(SiteSpec("ct", str(root)),),
                  label_map=parse_label_map(["cancer=background"]), cache_dir=str(tmp_path / "cache"))
    travelled = run_config_from_json(run_config_to_json(cfg))
    assert travelled.label_map == {"cancer": "background"}
    data = site_data(travelled, travelled.sites[0])
    assert data.train and data.dataset.label_names == tuple(n for n in CANCER_LABELS if n != "background")
    with pytest.raises(FedginError, match="has no mapping"):
        site_data(replace(travelled, label_map=None), travelled.sites[0])


def test_experiment_scenarios_open_their_sites_with_the_map(tmp_path, capsys):
    from fedgin.experiments.experiment import scenario_train_cases

    ct = cancer_dataset(tmp_path)
    mri = write_nnunet(tmp_path / "Dataset102_MR", [f"mr_{i}" for i in range(4)], modality="MRI")
    specs = [SiteSpec("ct", str(ct)), SiteSpec("mri", str(mri))]
    modalities = {"ct": "CT", "mri": "MRI"}
    with pytest.raises(FedginError, match="has no mapping"):
        scenario_train_cases("limited-1to1", specs, modalities, 0, None, "abdomen5")
    limits = scenario_train_cases("limited-1to1", specs, modalities, 0, None, "abdomen5", {"cancer": "background"})
    assert set(limits) == {"mri"}
    # a typo stops the experiment before any run is trained
    out = tmp_path / "exp"
    rc = main(["experiment", "--site", f"ct={ct}", "--site", f"mri={mri}", "--out", str(out), "--methods", "fedavg",
               "--label-map", "cancer=background", "--label-map", "cancr=liver"])
    assert rc == 2
    assert capsys.readouterr().err.strip().startswith("fedgin: error: --label-map cancr: no dataset has a label")
    assert not (out / "runs").exists()
