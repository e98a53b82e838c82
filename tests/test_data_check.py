"""``fedgin data check``: every bad input is one error line naming the file, exit code 2, no
traceback, inputs untouched; good datasets (the shared real bundle included) pass."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedgin.cli import main
from fedgin.data.nifti import write_volume

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def folder_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root`` and every folder's name (hidden ones included)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def _image(root: Path, case: str = "case_000") -> Path:
    return root / "imagesTr" / f"{case}_0000.nii.gz"


def _label(root: Path, case: str = "case_000") -> Path:
    return root / "labelsTr" / f"{case}.nii.gz"


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(root: Path) -> Path:
    path = _image(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_nifti(root: Path) -> Path:
    path = _label(root)
    path.write_text("case_000: liver, kidneys, spleen\n")
    return path


def _gzipped_not_nifti(root: Path) -> Path:
    path = _image(root)
    path.write_bytes(gzip.compress(b"\x00not a NIfTI header" * 40))
    return path


def _empty(root: Path) -> Path:
    path = _image(root)
    path.write_bytes(b"")
    return path


def _two_d(root: Path) -> Path:
    path = _image(root)
    write_volume(path, np.zeros((24, 20), np.int16), AFFINE)
    return path


def _four_d(root: Path) -> Path:
    path = _image(root)
    write_volume(path, np.zeros((24, 20, 6, 3), np.int16), AFFINE)
    return path


def _zero_size(root: Path) -> Path:
    path = _image(root)
    nib.save(nib.Nifti1Image(np.zeros((24, 0, 6), np.int16), AFFINE), str(path))
    return path


def _voxel(volume: Callable[[Path], Path], value, dtype) -> Callable[[Path], Path]:
    """Damage: case_000's image or label (``volume`` is ``_image`` or ``_label``) cast to ``dtype``,
    with one voxel set to ``value``."""
    def damage(root: Path) -> Path:
        path = volume(root)
        data = np.asanyarray(nib.load(str(path)).dataobj).astype(dtype)
        data[3, 4, 2] = value
        write_volume(path, data, AFFINE)
        return path

    return damage


def _label_shape(root: Path) -> Path:
    path = _label(root)
    write_volume(path, np.zeros((24, 20, 5), np.uint8), AFFINE)
    return path


def _label_affine(root: Path) -> Path:
    path = _label(root)
    label = np.asanyarray(nib.load(str(path)).dataobj)
    shifted = AFFINE.copy()
    shifted[:3, 3] = (0.0, 0.0, 12.0)
    write_volume(path, label, shifted)
    return path


def _missing_label(root: Path) -> Path:
    path = _label(root)
    path.unlink()
    return path


def _drop_channel_names(root: Path) -> Path:
    path = root / "dataset.json"
    _edit_json(path, lambda d: d.pop("channel_names"))
    return path


def _invalid_json(root: Path) -> Path:
    path = root / "dataset.json"
    path.write_text(path.read_text()[:-10])
    return path


def _dataset_json(**changes) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        path = root / "dataset.json"
        _edit_json(path, lambda d: d.update(changes))
        return path

    return damage


def _missing_folder(root: Path) -> Path:
    return root.parent / "Dataset999_DoesNotExist"


def _unlisted_organ(root: Path) -> Path:
    path = root / "manifest.json"
    path.write_text(json.dumps({"cases": [{"case": "case_000", "annotated": ["liver"]}]}))
    return _label(root)


# (damage, expected problem after "<file>: ") - the problem is matched as a regex on the whole rest of the line
MALFORMED = {
    "truncated-gz": (_truncate, r"truncated or corrupt voxel data \(.+\)"),
    "text-named-nii-gz": (_not_nifti, r"not a readable NIfTI file \(.*not a gzip file\)"),
    "gzip-of-non-nifti": (_gzipped_not_nifti, r"not a readable NIfTI file \(.+\)"),
    "empty-file": (_empty, r"empty file"),
    "2d-volume": (_two_d, r"expected a 3D volume, got 2D shape \(24, 20\)"),
    "4d-volume": (_four_d, r"expected a 3D volume, got 4D shape \(24, 20, 6, 3\)"),
    "zero-size-axis": (_zero_size, r"zero-size axis in shape \(24, 0, 6\)"),
    "nan-in-image": (_voxel(_image, np.nan, np.float32), r"image contains NaN or Inf values"),
    "inf-in-image": (_voxel(_image, np.inf, np.float32), r"image contains NaN or Inf values"),
    "label-shape": (_label_shape, r"label shape \(24, 20, 5\) != image shape \(24, 20, 6\)"),
    "label-affine": (_label_affine, r"label affine differs from the image affine"),
    "label-id-9": (_voxel(_label, 9, np.uint8), r"label ids \[9\] are not in the dataset's label mapping"),
    "fractional-label": (_voxel(_label, 1.5, np.float32),
                         r"label contains fractional values; expected integer label ids"),
    "negative-label": (_voxel(_label, -1, np.int16), r"label contains negative id -1"),
    "missing-label": (_missing_label, r"missing label for case case_000"),
    "no-channel_names": (_drop_channel_names, r"missing key\(s\): channel_names"),
    "invalid-json": (_invalid_json, r"invalid JSON \(.+\)"),
    "modality-PET": (_dataset_json(channel_names={"0": "PET"}),
                     r"unknown modality 'PET'; expected CT, or MRI/MR/T1/T2"),
    "numTraining": (_dataset_json(numTraining=5), r"numTraining is 5 but imagesTr holds 2 cases"),
    "numTraining-not-integer": (_dataset_json(numTraining="two"), r"numTraining must be an integer, got 'two'"),
    "negative-label-id": (_dataset_json(labels={"background": 0, "liver": -1}),
                          r"label 'liver' has negative id -1"),
    "shared-label-id": (_dataset_json(labels={"background": 0, "liver": 1, "spleen": 1}),
                        r"labels 'liver' and 'spleen' share id 1"),
    "unmapped-label-name": (_dataset_json(labels={"background": 0, "liver": 1, "tumour": 2}),
                            r"label 'tumour' \(id 2\) has no mapping to scheme abdomen5 "
                            r"\(--label-map tumour=ORGAN\|background maps it\)"),
    "missing-dataset": (_missing_folder, r"dataset folder not found"),
    "organ-not-annotated": (_unlisted_organ,
                            r"labels organ\(s\) \['kidneys', 'spleen', 'pancreas', 'gallbladder'\] "
                            r"that the manifest does not list as annotated"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_bad_input_is_one_error_line_and_leaves_inputs_untouched(kind, make_nnunet, capsys):
    damage, problem = MALFORMED[kind]
    root = make_nnunet()
    bad_file = damage(root)
    dataset = bad_file if not bad_file.is_relative_to(root) else root  # a missing dataset is named itself
    before = folder_digest(root.parent)
    capsys.readouterr()

    code = main(["data", "check", str(dataset)])

    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"fedgin: error: {re.escape(str(bad_file))}: {problem}", lines[0]), lines[0]
    assert folder_digest(root.parent) == before  # nothing modified, nothing written next to the data


def test_each_bad_case_gets_its_own_line_and_good_cases_still_listed(make_nnunet, capsys):
    root = make_nnunet(cases=["case_000", "case_001", "case_002"])
    nan_image = _voxel(_image, np.nan, np.float32)(root)
    bad_label = _label(root, "case_001")
    label = np.asanyarray(nib.load(str(bad_label)).dataobj).copy()
    label[0, 0, 0] = 9
    write_volume(bad_label, label, AFFINE)
    capsys.readouterr()

    code = main(["data", "check", str(root)])

    out, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [
        f"fedgin: error: {nan_image}: image contains NaN or Inf values",
        f"fedgin: error: {bad_label}: label ids [9] are not in the dataset's label mapping",
    ]
    assert " case_002 " in out and " case_000 " not in out
    assert out.splitlines()[-1] == "FAILED: 2 problem(s), 1 good case(s)"


def test_good_dataset_passes_and_prints_the_case_table(make_nnunet, capsys):
    ct = make_nnunet("Dataset001_CT")
    mri = make_nnunet("Dataset002_MR", modality="T2",
                      manifest={"case_000": ["liver", "kidney_right", "kidney_left", "spleen", "pancreas",
                                             "gallbladder"],
                                "case_001": ["liver", "kidney_right", "kidney_left", "spleen", "pancreas",
                                             "gallbladder"]})
    before = folder_digest(ct.parent)
    capsys.readouterr()

    code = main(["data", "check", str(ct), str(mri)])

    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "OK: 4 cases in 2 dataset(s) (CT, MRI), all readable and mapped"
    assert "24x20x6" in out and "1.5x1.5x3" in out
    assert "liver:yes kidneys:yes spleen:yes pancreas:yes gallbladder:yes" in out
    assert folder_digest(ct.parent) == before


def test_one_annotated_kidney_passes_in_both_schemes(make_nnunet, capsys):
    """A site that delineates only the right kidney: in abdomen5 the merged kidneys class is
    unknown for it (not an error), in abdomen6 kidney_right is annotated and present."""
    only_right = {"liver": 1, "kidney_right": 2, "spleen": 4}
    root = make_nnunet(cases={"case_000": only_right, "case_001": only_right},
                       manifest={c: ["liver", "kidney_right", "spleen"] for c in ("case_000", "case_001")})
    capsys.readouterr()

    assert main(["data", "check", str(root)]) == 0
    out5 = capsys.readouterr().out
    assert "liver:yes kidneys:? spleen:yes pancreas:? gallbladder:?" in out5

    assert main(["data", "check", "--scheme", "abdomen6", str(root)]) == 0
    out6 = capsys.readouterr().out
    assert "liver:yes kidney_right:yes kidney_left:? spleen:yes pancreas:? gallbladder:?" in out6


def test_shared_bundle_passes(shared_data, capsys):
    datasets = [shared_data / "Dataset801_AbdomenCT", shared_data / "Dataset802_AbdomenMR"]
    before = folder_digest(shared_data)

    code = main(["data", "check", *map(str, datasets)])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    assert out.splitlines()[-1] == "OK: 23 cases in 2 dataset(s) (CT, MRI), all readable and mapped"
    chaos_ct = next(line for line in out.splitlines() if " chaos_ct_liver " in line)
    assert "liver:yes kidneys:? spleen:? pancreas:? gallbladder:?" in chaos_ct
    chaos_mr = next(line for line in out.splitlines() if " chaos_t2_01 " in line)
    assert "liver:yes kidneys:yes spleen:yes pancreas:? gallbladder:?" in chaos_mr
    assert folder_digest(shared_data) == before
