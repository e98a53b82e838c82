"""Bad input through the commands that read data or models: ``fedgin train``, ``federate``,
``evaluate`` and ``predict``.

Every case must end with exit code 2 and exactly one stderr line ``fedgin: error: <file or
argument>: <problem>``, no traceback, nothing written (the output path does not appear, a
pre-existing output folder gains nothing) and every input byte-identical afterwards. The damaged
datasets are the ones ``fedgin data check`` is tested with (``test_data_check.MALFORMED``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_nnunet
from test_data_check import AFFINE, MALFORMED, folder_digest
from fedgin.cli import main
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import write_volume
from fedgin.data.preprocess import PreprocessConfig
from fedgin.engine.checkpoint import load_checkpoint, load_raw, save_checkpoint
from fedgin.engine.model import ModelConfig, build_model
from fedgin.errors import DataError, ModelError

TINY = ["--steps-per-epoch", "2", "--batch-size", "2"]


def make_checkpoint(path: Path, *, scheme: str = "abdomen5", out_channels: int | None = None) -> Path:
    """A valid (untrained) fedgin checkpoint of ``scheme``; ``out_channels`` may contradict it."""
    label_scheme = get_scheme(scheme)
    cfg = ModelConfig(out_channels=out_channels or label_scheme.num_classes)
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(cfg).state_dict(), model_config=cfg, scheme=label_scheme,
                           preprocess=PreprocessConfig(), sites=[{"name": "ct", "modality": "CT"}],
                           meta={"epoch": 1, "seed": 0})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


def refused(capsys, argv: list, watched: list[Path]) -> str:
    """Run ``fedgin ARGV`` expecting a refusal: exit code 2, one error line, no traceback and
    every file below ``watched`` unchanged, none added. Returns the error line."""
    before = snapshot(watched)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedgin: error: ")
    after = snapshot(watched)
    assert sorted(after.keys() - before.keys()) == [], "written despite the error"
    assert sorted(k for k in before if after.get(k) != before[k]) == [], "inputs modified or removed"
    return lines[0]


def snapshot(paths: list[Path]) -> dict[str, str]:
    """SHA-256 of every file (and the name of every folder) below or at ``paths``."""
    out: dict[str, str] = {}
    for path in paths:
        if path.is_dir():
            out.update({f"{path}/{k}": v for k, v in folder_digest(path).items()})
        else:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_line(line: str, named: Path | str, problem: str) -> None:
    """``line`` is ``fedgin: error: NAMED: PROBLEM`` (``problem`` a regex for the rest)."""
    assert re.fullmatch(rf"fedgin: error: {re.escape(str(named))}: {problem}", line), line


def damaged_dataset(tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    """A two-case CT dataset damaged as ``MALFORMED[kind]``: (dataset arg, bad file, problem)."""
    damage, problem = MALFORMED[kind]
    root = write_nnunet(tmp_path / "data" / "Dataset001_Site")
    bad = damage(root)
    return (bad if not bad.is_relative_to(root) else root), bad, problem


# --- dataset damage through train, federate and evaluate -------------------------------------------

# check.py alone compares label content with the manifest; the other commands treat the organ as unknown
DATA_KINDS = [k for k in MALFORMED if k != "organ-not-annotated"]


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_federate_refuses_bad_data_before_writing(kind, tmp_path, capsys):
    dataset, bad, problem = damaged_dataset(tmp_path, kind)
    out = tmp_path / "run"
    line = refused(capsys, ["federate", "--site", f"ct={dataset}", "--out", out, "--rounds", "1",
                            "--local-epochs", "1", *TINY], [tmp_path])
    assert_line(line, bad, problem)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing-dataset", "invalid-json", "nan-in-image", "label-affine"])
@pytest.mark.parametrize("mode", ["local", "centralized"])
def test_train_refuses_bad_data_before_writing(mode, kind, tmp_path, capsys):
    dataset, bad, problem = damaged_dataset(tmp_path, kind)
    out = tmp_path / "run"
    line = refused(capsys, ["train", "--mode", mode, "--site", f"ct={dataset}", "--out", out, "--epochs", "1",
                            *TINY], [tmp_path])
    assert_line(line, bad, problem)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["truncated-gz", "empty-file", "4d-volume", "nan-in-image", "label-shape",
                                  "label-affine", "label-id-9", "fractional-label", "missing-label",
                                  "modality-PET", "missing-dataset"])
def test_evaluate_refuses_bad_data_before_writing(kind, tmp_path, checkpoint, capsys):
    dataset, bad, problem = damaged_dataset(tmp_path, kind)
    out = tmp_path / "eval"
    line = refused(capsys, ["evaluate", "--model", checkpoint, "--data", dataset, "--out", out, "--cases", "all"],
                   [tmp_path, checkpoint])
    assert_line(line, bad, problem)
    assert not out.exists()


def test_evaluate_with_an_abdomen6_model_refuses_a_dataset_that_merges_the_kidneys(tmp_path, capsys):
    """The checkpoint's scheme decides how labels map: abdomen6 cannot split one 'kidneys' label."""
    model = make_checkpoint(tmp_path / "abdomen6.pt", scheme="abdomen6")
    labels = {"background": 0, "liver": 1, "kidneys": 2, "spleen": 4}
    root = write_nnunet(tmp_path / "Dataset003_Merged", labels=labels)
    out = tmp_path / "eval"
    line = refused(capsys, ["evaluate", "--model", model, "--data", root, "--out", out, "--cases", "all"],
                   [tmp_path])
    assert_line(line, root / "dataset.json",
                r"label 'kidneys' \(id 2\) merges kidney_left, kidney_right, which scheme abdomen6 keeps apart")


def test_evaluate_names_a_missing_split_file(tmp_path, checkpoint, capsys):
    root = write_nnunet(tmp_path / "Dataset001_Site")
    split = tmp_path / "no-such-split.json"
    line = refused(capsys, ["evaluate", "--model", checkpoint, "--data", root, "--out", tmp_path / "eval",
                            "--split", split], [tmp_path])
    assert_line(line, split, "split file not found")


def test_federate_names_duplicate_sites(tmp_path, capsys):
    root = write_nnunet(tmp_path / "Dataset001_Site")
    line = refused(capsys, ["federate", "--site", f"ct={root}", "--site", f"ct={root}", "--out", tmp_path / "run",
                            *TINY], [tmp_path])
    assert line == "fedgin: error: site names must be unique: ['ct', 'ct']"


# --- predict: bad input volumes ----------------------------------------------------------------------

PREDICT_KINDS = {  # MALFORMED damage of the image, and the problem predict reports
    "truncated-gz": MALFORMED["truncated-gz"][1],
    "gzip-of-non-nifti": MALFORMED["gzip-of-non-nifti"][1],
    "empty-file": MALFORMED["empty-file"][1],
    "2d-volume": r"expected a 3D volume, got shape \(24, 20\)",
    "4d-volume": r"expected a 3D volume, got shape \(24, 20, 6, 3\)",
    "zero-size-axis": MALFORMED["zero-size-axis"][1],
    "nan-in-image": MALFORMED["nan-in-image"][1],
    "inf-in-image": MALFORMED["inf-in-image"][1],
}


@pytest.mark.parametrize("existing_output", [False, True], ids=["new-output", "existing-output"])
@pytest.mark.parametrize("kind", list(PREDICT_KINDS))
def test_predict_refuses_a_bad_volume_and_writes_nothing(kind, existing_output, tmp_path, checkpoint, capsys):
    root = write_nnunet(tmp_path / "Dataset001_Site")
    bad = MALFORMED[kind][0](root)
    out = tmp_path / "pred"
    if existing_output:
        out.mkdir()
        (out / "earlier.nii.gz").write_bytes(b"an earlier prediction")
    line = refused(capsys, ["predict", "-i", bad, "-o", out, "--model", checkpoint, "--modality", "CT"],
                   [tmp_path, checkpoint])
    assert_line(line, bad, PREDICT_KINDS[kind])
    assert out.exists() == existing_output


def test_predict_refuses_a_4d_volume_inside_a_folder_before_any_output(tmp_path, checkpoint, capsys):
    """The header of every input is checked before the first output is written."""
    folder = tmp_path / "scans"
    write_volume(folder / "a_0000.nii.gz", np.zeros((24, 20, 6), np.int16), AFFINE)
    write_volume(folder / "b_0000.nii.gz", np.zeros((24, 20, 6, 2), np.int16), AFFINE)
    line = refused(capsys, ["predict", "-i", folder, "-o", tmp_path / "pred", "--model", checkpoint,
                            "--modality", "CT"], [tmp_path])
    assert_line(line, folder / "b_0000.nii.gz", r"expected a 3D volume, got shape \(24, 20, 6, 2\)")


def test_predict_refuses_a_folder_without_nifti_files(tmp_path, checkpoint, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("case_000: CT")
    (folder / "scan.dcm").write_bytes(b"DICM")
    line = refused(capsys, ["predict", "-i", folder, "-o", tmp_path / "pred", "--model", checkpoint],
                   [tmp_path])
    assert_line(line, folder, r"no \.nii or \.nii\.gz files and no DICOM files in folder")


def test_predict_names_a_missing_input(tmp_path, checkpoint, capsys):
    missing = tmp_path / "nowhere_0000.nii.gz"
    line = refused(capsys, ["predict", "-i", missing, "-o", tmp_path / "pred", "--model", checkpoint],
                   [tmp_path])
    assert_line(line, missing, "input not found")


def test_predict_refuses_an_unknown_modality_in_dataset_json(tmp_path, checkpoint, capsys):
    """Without --modality the modality comes from the dataset.json above the input."""
    root = write_nnunet(tmp_path / "Dataset001_Site")
    MALFORMED["modality-PET"][0](root)
    line = refused(capsys, ["predict", "-i", root / "imagesTr", "-o", tmp_path / "pred", "--model", checkpoint],
                   [tmp_path])
    assert_line(line, root / "dataset.json", MALFORMED["modality-PET"][1])


# --- bad models (checkpoints and run dirs) -----------------------------------------------------------


def _random_bytes(path: Path, good: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _truncated(path: Path, good: Path) -> Path:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(path: Path, good: Path) -> Path:
    path.write_bytes(b"")
    return path


def _plain_state_dict(path: Path, good: Path) -> Path:
    torch.save(build_model(ModelConfig()).state_dict(), path)
    return path


class _NotWeights:  # an arbitrary object: torch.load(weights_only=True) must refuse to unpickle it
    pass


def _pickled_object(path: Path, good: Path) -> Path:
    torch.save({"format": "fedgin-checkpoint-1", "state_dict": _NotWeights()}, path)
    return path


def _payload_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    def damage(path: Path, good: Path) -> Path:
        payload = load_raw(good)
        edit(payload)
        torch.save(payload, path)
        return path

    return damage


def _no_checkpoints(path: Path, good: Path) -> Path:
    run = path.parent / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    return run


def _missing(path: Path, good: Path) -> Path:
    return path.parent / "no-such-model.pt"


def _drop(key):
    return _payload_edit(lambda p: p.pop(key))


def _set_scheme(**changes):
    return _payload_edit(lambda p: p["scheme"].update(changes))


def _seven_channels(p: dict) -> None:
    p["model_config"]["out_channels"] = 7


BAD_MODELS = {  # damage(path, good checkpoint) -> the --model argument; the problem after "<model>: "
    "random-bytes": (_random_bytes, r"damaged or not a fedgin checkpoint \(.+\)"),
    "truncated": (_truncated, r"damaged or not a fedgin checkpoint \(.+\)"),
    "empty": (_empty, r"damaged or not a fedgin checkpoint \(.+\)"),
    "plain-state-dict": (_plain_state_dict, r"not a fedgin checkpoint \(format fedgin-checkpoint-1 expected\)"),
    "pickled-object": (_pickled_object, r"damaged or not a fedgin checkpoint \(.+\)"),
    "no-preprocess": (_drop("preprocess"), r"incomplete checkpoint \(missing 'preprocess'\)"),
    "weights-vs-architecture": (_payload_edit(_seven_channels),
                                r"weights do not fit the stored architecture \(.+\)"),
    "scheme-organs-differ": (_set_scheme(organs=["liver", "kidneys", "spleen", "pancreas", "stomach"]),
                             r"label scheme abdomen5 differs from this fedgin's definition"),
    "run-dir-without-checkpoints": (_no_checkpoints, r"not a run dir with checkpoints/last\.pt"),
    "missing": (_missing, r"model not found"),
}


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_predict_refuses_a_bad_model(kind, tmp_path, checkpoint, capsys):
    damage, problem = BAD_MODELS[kind]
    model = damage(tmp_path / "model.pt", checkpoint)
    root = write_nnunet(tmp_path / "Dataset001_Site")
    image = root / "imagesTr" / "case_000_0000.nii.gz"
    out = tmp_path / "pred"
    line = refused(capsys, ["predict", "-i", image, "-o", out, "--model", model], [tmp_path, checkpoint])
    assert_line(line, model, problem)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "scheme-organs-differ", "run-dir-without-checkpoints"])
def test_evaluate_refuses_a_bad_model(kind, tmp_path, checkpoint, capsys):
    damage, problem = BAD_MODELS[kind]
    model = damage(tmp_path / "model.pt", checkpoint)
    root = write_nnunet(tmp_path / "Dataset001_Site")
    out = tmp_path / "eval"
    line = refused(capsys, ["evaluate", "--model", model, "--data", root, "--out", out, "--cases", "all"],
                   [tmp_path, checkpoint])
    assert_line(line, model, problem)
    assert not out.exists()


def test_a_checkpoint_of_an_unknown_scheme_is_refused_naming_the_file(tmp_path, checkpoint, capsys):
    model = _set_scheme(name="abdomen9")(tmp_path / "model.pt", checkpoint)
    root = write_nnunet(tmp_path / "Dataset001_Site")
    line = refused(capsys, ["predict", "-i", root / "imagesTr", "-o", tmp_path / "pred", "--model", model],
                   [tmp_path])
    assert_line(line, model, r".*unknown label scheme 'abdomen9'.*")


def test_load_checkpoint_refuses_another_label_scheme(tmp_path):
    model = make_checkpoint(tmp_path / "abdomen6.pt", scheme="abdomen6")
    assert load_checkpoint(model, expect_scheme="abdomen6").scheme.name == "abdomen6"
    with pytest.raises(ModelError) as info:
        load_checkpoint(model, expect_scheme="abdomen5")
    assert str(info.value) == f"{model}: checkpoint uses label scheme abdomen6, expected abdomen5"


def test_load_checkpoint_refuses_a_scheme_that_differs_from_fedgins_definition(tmp_path, checkpoint):
    swapped = ["liver", "spleen", "kidneys", "pancreas", "gallbladder"]  # same organs, other ids
    model = _set_scheme(organs=swapped)(tmp_path / "model.pt", checkpoint)
    with pytest.raises(ModelError) as info:
        load_checkpoint(model)
    assert str(info.value) == f"{model}: label scheme abdomen5 differs from this fedgin's definition"


def test_load_checkpoint_refuses_output_channels_that_contradict_the_scheme(tmp_path):
    model = make_checkpoint(tmp_path / "model.pt", scheme="abdomen5", out_channels=7)
    with pytest.raises(ModelError, match="7 output channels"):
        load_checkpoint(model)


# --- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["train", "--mode", "local", "--site", "ct", "--out", "{tmp}/run"],
    ["federate", "--site", "=data", "--out", "{tmp}/run"],
    ["federate", "--site", "ct=", "--out", "{tmp}/run"],
], ids=["no-equals", "no-name", "no-dataset"])
def test_site_without_name_equals_dataset_is_a_usage_error(argv, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    line = refused(capsys, argv, [tmp_path])
    site = argv[argv.index("--site") + 1]
    assert line == (f"fedgin: error: argument --site: --site takes NAME=DATASET, got {site!r} "
                    f"(see fedgin {argv[0]} --help)")
    assert not (tmp_path / "run").exists()


def _run_dir(tmp_path: Path, checkpoint: Path, names: tuple[str, ...]) -> Path:
    """A run dir whose ``checkpoints/`` holds copies of ``checkpoint`` under ``names``."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in names:
        (run / "checkpoints" / f"{name}.pt").write_bytes(checkpoint.read_bytes())
    return run


def _train(site: str, *extra) -> list:
    return ["train", "--mode", "local", "--site", site, "--out", "{tmp}/run-out", *TINY, *extra]


def _federate(site: str, *extra) -> list:
    return ["federate", "--site", site, "--out", "{tmp}/run-out", *TINY, *extra]


def _predict(*extra, model="{model}", output="{tmp}/pred") -> list:
    return ["predict", "-i", "{image}", "-o", output, "--model", model, *extra]


def _argument(option: str, problem: str, command: str) -> str:
    return rf"fedgin: error: argument {re.escape(option)}: {problem} \(see fedgin {command} --help\)"


MISUSE = {  # argv -> the whole error line, a regex; {tmp}, {data}, {image}, {model}, {run}, {file} filled in
    "predict-output-is-a-file": (_predict(output="{file}"),
                                 r"fedgin: error: {file}: exists and is not a folder \(-o takes an output folder\)"),
    "predict-input-not-nifti": (["predict", "-i", "{file}", "-o", "{tmp}/pred", "--model", "{model}"],
                                r"fedgin: error: {file}: not a NIfTI file \(-i takes a \.nii or \.nii\.gz file, "
                                r"a folder of them, or a DICOM series folder\)"),
    "predict-bad-modality": (_predict("--modality", "PET"),
                             _argument("--modality", r"invalid choice: 'PET' \(choose from .*\)", "predict")),
    "predict-no-model": (["predict", "-i", "{image}", "-o", "{tmp}/pred"],
                         r"fedgin: error: the following arguments are required: --model \(see fedgin predict --help\)"),
    "predict-checkpoint-with-a-file": (_predict("--checkpoint", "last"),
                                       r"fedgin: error: --checkpoint picks a checkpoint of a run dir, but --model "
                                       r"{model} is a checkpoint file"),
    "predict-checkpoint-best": (_predict("--checkpoint", "best", model="{run}"),
                                r"fedgin: error: --checkpoint takes last, round_N or epoch_N, got 'best'"),
    "predict-checkpoint-not-in-run": (_predict("--checkpoint", "round_9", model="{run}"),
                                      r"fedgin: error: {run}: no checkpoint round_009 in this run dir "
                                      r"\(it has: last, round_001\.\.round_003, round_005\)"),
    "predict-epoch-of-a-federated-run": (_predict("--checkpoint", "epoch_1", model="{run}"),
                                         r"fedgin: error: {run}: no checkpoint epoch_001 in this run dir .*"),
    "federate-rounds-0": (_federate("ct={data}", "--rounds", "0"),
                          _argument("--rounds", "must be a positive integer, got '0'", "federate")),
    "federate-rounds-negative": (_federate("ct={data}", "--rounds", "-2"),
                                 _argument("--rounds", "must be a positive integer, got '-2'", "federate")),
    "federate-local-epochs-0": (_federate("ct={data}", "--local-epochs", "0"),
                                _argument("--local-epochs", "must be a positive integer, got '0'", "federate")),
    "federate-threads-negative": (_federate("ct={data}", "--threads", "-1"),
                                  _argument("--threads", "must be a positive integer, got '-1'", "federate")),
    "federate-dataset-is-a-file": (_federate("ct={file}"), r"fedgin: error: {file}: expected a dataset folder"),
    "federate-bad-strategy": (_federate("ct={data}", "--strategy", "fedsgd"),
                              _argument("--strategy", r"invalid choice: 'fedsgd' \(choose from .*\)", "federate")),
    "train-epochs-0": (_train("ct={data}", "--epochs", "0"),
                       _argument("--epochs", "must be a positive integer, got '0'", "train")),
    "train-batch-size-0": (_train("ct={data}", "--batch-size", "0"),
                           _argument("--batch-size", "must be a positive integer, got '0'", "train")),
    "train-lr-0": (_train("ct={data}", "--lr", "0"), _argument("--lr", "must be a positive number, got '0'", "train")),
    "train-lr-negative": (_train("ct={data}", "--lr", "-0.001"),
                          _argument("--lr", "must be a positive number, got '-0.001'", "train")),
    "train-lr-not-a-number": (_train("ct={data}", "--lr", "fast"),
                              _argument("--lr", "expected a positive number, got 'fast'", "train")),
    "train-steps-per-epoch-0": (_train("ct={data}", "--steps-per-epoch", "0"),
                                _argument("--steps-per-epoch", "must be a positive integer, got '0'", "train")),
    "train-threads-negative": (_train("ct={data}", "--threads", "-1"),
                               _argument("--threads", "must be a positive integer, got '-1'", "train")),
    "train-out-is-a-file": (["train", "--mode", "local", "--site", "ct={data}", "--out", "{file}", *TINY],
                            r"fedgin: error: {file}: exists and is not a folder \(--out takes an output folder\)"),
    "train-no-mode": (["train", "--site", "ct={data}", "--out", "{tmp}/run-out"],
                      r"fedgin: error: the following arguments are required: --mode \(see fedgin train --help\)"),
    "evaluate-out-is-a-file": (["evaluate", "--model", "{model}", "--data", "{data}", "--out", "{file}"],
                               r"fedgin: error: {file}: exists and is not a folder \(--out takes an output folder\)"),
    "no-command": ([], r"fedgin: error: the following arguments are required: command \(see fedgin --help\)"),
}


@pytest.mark.parametrize("kind", list(MISUSE))
def test_command_line_misuse_is_one_line_and_writes_nothing(kind, tmp_path, checkpoint, capsys):
    """Every misuse of the command line, argparse's own refusals included, is the one line of bad
    data: exit code 2, ``fedgin: error: ...``, no traceback, no usage block, nothing written."""
    data = write_nnunet(tmp_path / "Dataset001_Site")
    places = {"tmp": tmp_path, "data": data, "image": data / "imagesTr" / "case_000_0000.nii.gz",
              "model": checkpoint, "run": _run_dir(tmp_path, checkpoint, ("last", "round_001", "round_002",
                                                                           "round_003", "round_005")),
              "file": tmp_path / "notes.txt"}
    places["file"].write_text("not a folder, not a volume")
    argv, expected = MISUSE[kind]
    line = refused(capsys, [str(a).format(**places) for a in argv], [tmp_path, checkpoint])
    pattern = expected.format(**{name: re.escape(str(value)) for name, value in places.items()})
    assert re.fullmatch(pattern, line), line


def test_debug_shows_the_traceback(tmp_path, checkpoint, capsys):
    """``--debug`` lets the error propagate (Python prints the traceback) instead of one line."""
    root = write_nnunet(tmp_path / "Dataset001_Site")
    bad = MALFORMED["nan-in-image"][0](root)
    with pytest.raises(DataError, match="image contains NaN or Inf values") as info:
        main(["--debug", "predict", "-i", str(bad), "-o", str(tmp_path / "pred"), "--model", str(checkpoint),
              "--modality", "CT"])
    assert info.traceback[-1].name == "read_volume"
    assert "fedgin: error:" not in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_train_resume_refuses_a_corrupt_last_checkpoint_without_touching_the_run(tmp_path, capsys):
    root = write_nnunet(tmp_path / "Dataset001_Site")
    run = tmp_path / "run"
    args = ["train", "--mode", "centralized", "--site", f"ct={root}", "--out", run, *TINY]
    assert main([str(a) for a in [*args, "--epochs", "1"]]) == 0
    last = run / "checkpoints" / "last.pt"
    _truncated(last, last)
    line = refused(capsys, [*args, "--epochs", "2", "--resume"], [tmp_path])
    assert_line(line, last, BAD_MODELS["truncated"][1])
