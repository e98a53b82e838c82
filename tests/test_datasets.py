"""Dataset adapters on layouts written exactly as each source ships them: nnU-Net v2 raw,
TotalSegmentator subject folders and AMOS 2022; label mapping to the scheme, partial labels, and
the train/val/test splits of a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ABDOMEN_LABELS, SHAPE, phantom_case, write_nnunet
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import write_volume
from fedgin.data.splits import Split, builtin_split_files, seeded_split, split_for
from fedgin.errors import DataError

ABDOMEN5 = get_scheme("abdomen5")
ABDOMEN6 = get_scheme("abdomen6")
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
ALL_FINE = ("liver", "kidney_right", "kidney_left", "spleen", "pancreas", "gallbladder")

# a site that names its structures its own way and in its own order
ALIAS_LABELS = {"background": 0, "liver": 1, "kidney_left": 2, "kidney_right": 3, "gall_bladder": 4,
                "stomach": 5, "spleen": 6, "pancreas": 7}
ALIAS_PAINT = {"liver": 1, "kidney_left": 2, "kidney_right": 3, "gallbladder": 4, "stomach": 5, "spleen": 6,
               "pancreas": 7}


def expected(ids: dict[str, int]) -> np.ndarray:
    """The label map with each organ's box set to its expected scheme id (others background)."""
    return phantom_case(SHAPE, organs=ids)[1]


# --- nnU-Net v2 raw ---------------------------------------------------------------------------


def test_nnunet_aliases_map_to_abdomen5(make_nnunet):
    root = make_nnunet(cases={"case_000": ALIAS_PAINT}, labels=ALIAS_LABELS, test_cases=["case_100"])

    dataset = open_dataset(root, ABDOMEN5)

    assert (dataset.name, dataset.modality, dataset.source) == ("Dataset001_Site", "CT", "nnunet")
    assert [c.case_id for c in dataset.cases] == ["case_000"]
    assert [c.case_id for c in dataset.test_cases] == ["case_100"]
    image, label, affine = dataset.cases[0].read(ABDOMEN5)
    source_image, _ = phantom_case(SHAPE, organs=ALIAS_PAINT, seed=0)
    assert image.dtype == np.float32 and np.array_equal(image, source_image.astype(np.float32))
    assert np.array_equal(affine, AFFINE)
    assert label.dtype == np.uint8
    # both kidneys -> kidneys (2), gall_bladder -> gallbladder (5), stomach -> background
    assert np.array_equal(label, expected({"liver": 1, "kidney_left": 2, "kidney_right": 2, "gallbladder": 5,
                                           "spleen": 3, "pancreas": 4}))
    assert dataset.cases[0].annotated == ("liver", "kidneys", "spleen", "pancreas", "gallbladder")
    assert dataset.test_cases[0].label is None
    test_image, test_label, _ = dataset.test_cases[0].read(ABDOMEN5)
    assert test_image.shape == SHAPE and test_label is None


def test_nnunet_aliases_map_to_abdomen6(make_nnunet):
    root = make_nnunet(cases={"case_000": ALIAS_PAINT}, labels=ALIAS_LABELS)

    _, label, _ = open_dataset(root, ABDOMEN6).cases[0].read(ABDOMEN6)

    assert np.array_equal(label, expected({"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4,
                                           "pancreas": 5, "gallbladder": 6}))


@pytest.mark.parametrize(("channel", "modality"), [("CT", "CT"), ("MRI", "MRI"), ("MR", "MRI"), ("T1", "MRI"),
                                                   ("t2", "MRI")])
def test_nnunet_channel_name_gives_the_modality(make_nnunet, channel, modality):
    dataset = open_dataset(make_nnunet(modality=channel), ABDOMEN5)
    assert dataset.modality == modality
    assert {c.modality for c in dataset.cases} == {modality}


def test_nnunet_unmapped_label_name_is_an_error_naming_dataset_json(make_nnunet):
    root = make_nnunet(labels={**ABDOMEN_LABELS, "tumour": 7})

    with pytest.raises(DataError) as info:
        open_dataset(root, ABDOMEN5)

    assert info.value.path == root / "dataset.json"
    assert str(info.value) == (f"{root / 'dataset.json'}: label 'tumour' (id 7) has no mapping to scheme abdomen5 "
                               "(--label-map tumour=ORGAN|background maps it)")


def test_nnunet_one_label_for_both_kidneys(make_nnunet):
    labels = {"background": 0, "liver": 1, "kidneys": 2}
    root = make_nnunet(cases={"case_000": {"liver": 1, "kidney_right": 2, "kidney_left": 2}}, labels=labels)

    case = open_dataset(root, ABDOMEN5).cases[0]
    assert case.annotated == ("liver", "kidneys")
    _, label, _ = case.read(ABDOMEN5)
    assert np.array_equal(label, expected({"liver": 1, "kidney_right": 2, "kidney_left": 2}))

    # abdomen6 cannot tell the two kidneys apart in such a label: refused, not guessed
    with pytest.raises(DataError, match=r"dataset\.json: label 'kidneys' \(id 2\) merges kidney_left, "
                                        r"kidney_right, which scheme abdomen6 keeps apart$"):
        open_dataset(root, ABDOMEN6)


def test_nnunet_label_ids_outside_dataset_json_are_refused_on_read(make_nnunet):
    root = make_nnunet(labels={"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3},
                       cases={"case_000": {"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4}})
    case = open_dataset(root, ABDOMEN5).cases[0]

    with pytest.raises(DataError) as info:
        case.read(ABDOMEN5)

    assert str(info.value) == f"{case.label}: label ids [4] are not in the dataset's label mapping"


# --- partial annotation -------------------------------------------------------------------------

CHAOS = ["liver", "kidney_right", "kidney_left", "spleen"]


@pytest.mark.parametrize(
    ("annotated", "abdomen5", "abdomen6"),
    [
        (CHAOS, ("liver", "kidneys", "spleen"), ("liver", "kidney_right", "kidney_left", "spleen")),
        (["liver", "kidney_right"], ("liver",), ("liver", "kidney_right")),
        (["liver"], ("liver",), ("liver",)),
        (["Gall Bladder", "right_kidney", "left_kidney"], ("kidneys", "gallbladder"),
         ("kidney_right", "kidney_left", "gallbladder")),
    ],
)
def test_manifest_restricts_annotated_organs(make_nnunet, annotated, abdomen5, abdomen6):
    root = make_nnunet(cases=["case_000", "case_001"], manifest={"case_000": annotated})

    for scheme, organs in ((ABDOMEN5, abdomen5), (ABDOMEN6, abdomen6)):
        dataset = open_dataset(root, scheme)
        assert dataset.case("case_000").annotated == organs
        # a case the manifest does not list: every labelled organ is annotated
        assert dataset.case("case_001").annotated == scheme.organs


def test_without_manifest_the_dataset_json_labels_are_annotated(make_nnunet):
    labels = {"background": 0, "liver": 1, "spleen": 2, "gallbladder": 3}
    root = make_nnunet(labels=labels)

    assert [c.annotated for c in open_dataset(root, ABDOMEN5).cases] == [("liver", "spleen", "gallbladder")] * 2
    assert [c.annotated for c in open_dataset(root, ABDOMEN6).cases] == [("liver", "spleen", "gallbladder")] * 2


def test_manifest_cannot_annotate_more_than_dataset_json_labels(make_nnunet):
    root = make_nnunet(labels={"background": 0, "liver": 1}, manifest={"case_000": CHAOS})
    assert open_dataset(root, ABDOMEN5).case("case_000").annotated == ("liver",)


def test_manifest_with_an_unknown_organ_is_an_error_naming_it(make_nnunet):
    root = make_nnunet(manifest={"case_000": ["liver", "tumour"]})

    with pytest.raises(DataError) as info:
        open_dataset(root, ABDOMEN5)

    assert str(info.value) == f"{root / 'manifest.json'}: annotated organ 'tumour' is unknown"


def test_shared_bundle_partial_annotation(shared_data):
    ct = open_dataset(shared_data / "Dataset801_AbdomenCT", ABDOMEN5)
    mr = open_dataset(shared_data / "Dataset802_AbdomenMR", ABDOMEN5)
    assert (ct.modality, len(ct.cases), mr.modality, len(mr.cases)) == ("CT", 8, "MRI", 15)
    assert ct.case("chaos_ct_liver").annotated == ("liver",)
    assert ct.case("btcv_sabs_00").annotated == ("liver", "kidneys", "spleen")
    assert ct.case("tsds_s0009").annotated == ABDOMEN5.organs
    assert mr.case("chaos_t2_01").annotated == ("liver", "kidneys", "spleen")
    assert mr.case("ts_example_mr").annotated == ABDOMEN5.organs


# --- TotalSegmentator ---------------------------------------------------------------------------

# TotalSegmentator ships one binary mask per structure (104+), most of them not targets
TS_NON_TARGETS = ("stomach", "aorta", "vertebrae_L1")


def _write_totalseg_subject(root: Path, subject: str, *, image_name: str = "ct.nii.gz",
                            organs: tuple[str, ...] = ALL_FINE, seed: int = 0) -> None:
    folder = root / subject
    modality = "CT" if image_name.startswith("ct") else "MRI"
    paint = {o: 1 for o in (*organs, "stomach")}
    image, _ = phantom_case(SHAPE, modality=modality, seed=seed, organs=paint)
    write_volume(folder / image_name, image, AFFINE)
    for organ in (*organs, *TS_NON_TARGETS):
        box = "stomach" if organ in TS_NON_TARGETS else organ  # non-targets overlap, as they may
        mask = phantom_case(SHAPE, organs={box: 1})[1]
        write_volume(folder / "segmentations" / f"{organ}.nii.gz", mask, AFFINE)


def test_totalsegmentator_subject_folders(tmp_path):
    root = tmp_path / "Totalsegmentator_dataset"
    _write_totalseg_subject(root, "s0001")
    _write_totalseg_subject(root, "s0002", organs=tuple(o for o in ALL_FINE if o != "gallbladder"), seed=1)
    (root / "meta.csv").write_text("image_id;age;gender\ns0001;60;f\ns0002;71;m\n")

    dataset = open_dataset(root, ABDOMEN5)

    assert (dataset.modality, dataset.source) == ("CT", "totalsegmentator")
    assert [c.case_id for c in dataset.cases] == ["s0001", "s0002"]
    s1, s2 = dataset.cases
    assert s1.annotated == ABDOMEN5.organs
    assert s2.annotated == ("liver", "kidneys", "spleen", "pancreas")  # no gallbladder mask: unknown
    image, label, affine = s1.read(ABDOMEN5)
    assert np.array_equal(image, phantom_case(SHAPE, organs={o: 1 for o in (*ALL_FINE, "stomach")})[0])
    assert np.array_equal(affine, AFFINE)
    assert np.array_equal(label, expected({"liver": 1, "kidney_right": 2, "kidney_left": 2, "spleen": 3,
                                           "pancreas": 4, "gallbladder": 5}))
    _, label2, _ = s2.read(ABDOMEN5)
    assert np.array_equal(label2, expected({"liver": 1, "kidney_right": 2, "kidney_left": 2, "spleen": 3,
                                            "pancreas": 4}))

    _, label6, _ = open_dataset(root, ABDOMEN6).cases[0].read(ABDOMEN6)
    assert np.array_equal(label6, expected({"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4,
                                            "pancreas": 5, "gallbladder": 6}))


def test_totalsegmentator_mri_subject(tmp_path):
    root = tmp_path / "TotalsegmentatorMRI_dataset"
    _write_totalseg_subject(root, "s0011", image_name="mri.nii.gz")

    dataset = open_dataset(root, ABDOMEN5)

    assert dataset.modality == "MRI" and dataset.cases[0].modality == "MRI"
    # a single subject folder also opens on its own
    single = open_dataset(root / "s0011", ABDOMEN5)
    assert [c.case_id for c in single.cases] == ["s0011"]


def test_totalsegmentator_non_binary_mask_is_refused(tmp_path):
    root = tmp_path / "ts"
    _write_totalseg_subject(root, "s0001")
    liver = root / "s0001" / "segmentations" / "liver.nii.gz"
    write_volume(liver, phantom_case(SHAPE, organs={"liver": 2})[1], AFFINE)

    with pytest.raises(DataError) as info:
        open_dataset(root, ABDOMEN5).cases[0].read(ABDOMEN5)

    assert str(info.value) == f"{liver}: binary mask expected, found value 2"


# --- AMOS 2022 ------------------------------------------------------------------------------------

AMOS_PAINT = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 6, "stomach": 7,
              "pancreas": 10}
AMOS_JSON = {
    "name": "AMOS", "description": "MICCAI2022 Multi-Modality Abdominal Multi-Organ Segmentation Challenge",
    "tensorImageSize": "3D", "modality": {"0": "CT"},
    "labels": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
               "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava",
               "10": "pancreas", "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum",
               "14": "bladder", "15": "prostate/uterus"},
    "numTraining": 2, "numTest": 1,
}


def _write_amos(root: Path) -> Path:
    for split, case, seed in (("Tr", "amos_0001", 0), ("Tr", "amos_0540", 1), ("Va", "amos_0008", 2)):
        modality = "MRI" if int(case[-4:]) >= 500 else "CT"
        image, label = phantom_case(SHAPE, modality=modality, organs=AMOS_PAINT, seed=seed)
        write_volume(root / f"images{split}" / f"{case}.nii.gz", image, AFFINE)
        write_volume(root / f"labels{split}" / f"{case}.nii.gz", label, AFFINE)
    # AMOS ships unlabelled test images: not training data
    write_volume(root / "imagesTs" / "amos_0002.nii.gz", phantom_case(SHAPE)[0], AFFINE)
    write_volume(root / "imagesTr" / "amos_0003.nii.gz", phantom_case(SHAPE)[0], AFFINE)
    (root / "dataset.json").write_text(json.dumps(AMOS_JSON))
    return root


def test_amos_ct_cases_and_label_ids(tmp_path):
    root = _write_amos(tmp_path / "amos22")

    dataset = open_dataset(root, ABDOMEN5)

    assert (dataset.name, dataset.modality, dataset.source) == ("amos22-CT", "CT", "amos")
    assert [c.case_id for c in dataset.cases] == ["amos_0001", "amos_0008"]
    case = dataset.cases[0]
    assert case.annotated == ABDOMEN5.organs
    _, label, _ = case.read(ABDOMEN5)
    assert np.array_equal(label, expected({"spleen": 3, "kidney_right": 2, "kidney_left": 2, "gallbladder": 5,
                                           "liver": 1, "pancreas": 4}))  # stomach (7) -> background
    _, label6, _ = open_dataset(root, ABDOMEN6).cases[0].read(ABDOMEN6)
    assert np.array_equal(label6, expected({"spleen": 4, "kidney_right": 2, "kidney_left": 3, "gallbladder": 6,
                                            "liver": 1, "pancreas": 5}))


@pytest.mark.parametrize("suffix", [":MRI", ":MR", ":mri"])
def test_amos_mri_cases_by_path_suffix(tmp_path, suffix):
    root = _write_amos(tmp_path / "amos22")

    dataset = open_dataset(f"{root}{suffix}", ABDOMEN5)

    assert (dataset.name, dataset.modality) == ("amos22-MRI", "MRI")
    assert [(c.case_id, c.modality) for c in dataset.cases] == [("amos_0540", "MRI")]
    _, label, _ = dataset.cases[0].read(ABDOMEN5)
    assert np.array_equal(label, expected({"spleen": 3, "kidney_right": 2, "kidney_left": 2, "gallbladder": 5,
                                           "liver": 1, "pancreas": 4}))


def test_amos_label_id_beyond_the_table_is_refused(tmp_path):
    root = _write_amos(tmp_path / "amos22")
    label_path = root / "labelsTr" / "amos_0001.nii.gz"
    write_volume(label_path, phantom_case(SHAPE, organs={"liver": 16})[1], AFFINE)

    with pytest.raises(DataError) as info:
        open_dataset(root, ABDOMEN5).cases[0].read(ABDOMEN5)

    assert str(info.value) == f"{label_path}: label ids [16] are not in the dataset's label mapping"


# --- detection ----------------------------------------------------------------------------------


def test_a_folder_of_no_known_layout_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        open_dataset(tmp_path, ABDOMEN5)
    assert str(info.value).startswith(f"{tmp_path}: not a dataset: no dataset.json (nnU-Net)")


def test_written_dataset_opens_with_write_nnunet_defaults(tmp_path):
    root = write_nnunet(tmp_path / "Dataset009_X", cases=["a", "b", "c"], num_training=None)
    assert [c.case_id for c in open_dataset(root, ABDOMEN5).cases] == ["a", "b", "c"]


# --- splits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "sizes"), [(2, (2, 0, 0)), (3, (2, 0, 1)), (8, (5, 1, 2)), (12, (7, 2, 3)),
                                          (15, (9, 2, 4))])
def test_seeded_split_is_deterministic_disjoint_and_complete(n, sizes):
    ids = [f"case_{i:03d}" for i in range(n)]

    split = seeded_split(ids, seed=3)

    assert split == seeded_split(list(reversed(ids)), seed=3)  # input order does not matter
    parts = (split.train, split.val, split.test)
    assert tuple(len(p) for p in parts) == sizes
    assert sorted(split.train + split.val + split.test) == ids
    assert all(list(p) == sorted(p) for p in parts)
    assert split.to_dict() == {"train": list(split.train), "val": list(split.val), "test": list(split.test),
                               "source": "seeded (seed 3)"}


def test_seeded_split_depends_on_the_seed():
    ids = [f"case_{i:03d}" for i in range(12)]
    tests = {seeded_split(ids, seed=s).test for s in range(5)}
    assert len(tests) > 1


def test_shipped_split_names_only_bundle_cases_and_no_model_labels_in_test(shared_data):
    (split_file,) = [p for p in builtin_split_files() if p.name == "abdomen-ct-mr.json"]
    shipped = json.loads(split_file.read_text())["datasets"]
    assert sorted(shipped) == ["Dataset801_AbdomenCT", "Dataset802_AbdomenMR"]
    for name, entry in shipped.items():
        dataset = open_dataset(shared_data / name, ABDOMEN5)
        ids = sorted(c.case_id for c in dataset.cases)
        named = entry["train"] + entry["val"] + entry["test"]
        assert sorted(named) == ids  # every case exactly once
        assert not [c for c in entry["test"] if c.startswith("ts_example_")]
        assert len(entry["val"]) == 1
        assert split_for(name, ids, seed=0) == Split(tuple(entry["train"]), tuple(entry["val"]), tuple(entry["test"]),
                                                     source="shipped abdomen-ct-mr.json")


def test_split_for_falls_back_to_the_seeded_split(tmp_path):
    ids = [f"case_{i:03d}" for i in range(8)]
    assert split_for("Dataset123_Unknown", ids, seed=1) == seeded_split(ids, seed=1)


def test_a_shipped_split_applies_only_to_a_dataset_whose_cases_it_names():
    """A user's own dataset that happens to be called like a shipped one gets the seeded split (and
    says so), not an "unknown case ids" error; the shared bundle itself still gets the shipped one."""
    (split_file,) = [p for p in builtin_split_files() if p.name == "abdomen-ct-mr.json"]
    entry = json.loads(split_file.read_text())["datasets"]["Dataset802_AbdomenMR"]
    own = [f"patient_{i:03d}" for i in range(9)]
    split = split_for("Dataset802_AbdomenMR", own, seed=2)
    assert split == seeded_split(own, seed=2) and split.source == "seeded (seed 2)"
    bundle = entry["train"] + entry["val"] + entry["test"]
    assert split_for("Dataset802_AbdomenMR", bundle, seed=2).source == "shipped abdomen-ct-mr.json"
    # a dataset with every shipped case and more still gets the shipped split: the extra cases are
    # simply not used
    assert split_for("Dataset802_AbdomenMR", bundle + ["extra_case"], seed=2).test == tuple(entry["test"])


def test_split_file_naming_an_unknown_case_is_an_error(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"Dataset001_Site": {"train": ["case_000"], "val": [], "test": ["case_999"]}}))

    assert split_for("Dataset001_Site", ["case_000", "case_999"], seed=0, split_file=str(path)).test == ("case_999",)
    with pytest.raises(DataError) as info:
        split_for("Dataset001_Site", ["case_000", "case_001"], seed=0, split_file=str(path))
    assert str(info.value) == f"{path}: Dataset001_Site: unknown case ids ['case_999']"
