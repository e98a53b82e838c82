"""Synthetic phantoms: reproducible, readable as datasets, anatomically honest in world (RAS+) space,
and rendered with CT and MRI contrasts that genuinely differ."""

from __future__ import annotations

import json
from functools import lru_cache

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedgin.cli import main
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.errors import DataError, FedginError
from fedgin.synthetic import (
    CT_DATASET,
    MRI_DATASET,
    MRI_PARTIAL_ORGANS,
    PHANTOM_LABELS,
    make_phantom,
    write_phantom_datasets,
)

ORGANS = ("liver", "kidney_right", "kidney_left", "spleen", "pancreas", "gallbladder")


@lru_cache(maxsize=None)
def _case(seed: int, modality: str):
    return make_phantom(seed, modality)


def _world(case, mask: np.ndarray) -> np.ndarray:
    """World (RAS+ mm) coordinates, N x 3, of the voxels of ``mask``."""
    ijk = np.argwhere(mask).astype(float)
    return ijk @ case.affine[:3, :3].T + case.affine[:3, 3]


def _centroid(case, organ: str) -> np.ndarray:
    return _world(case, case.label == PHANTOM_LABELS[organ]).mean(axis=0)


def _midline_x(case) -> float:
    """World x of the body's centroid: the largest connected region above an air threshold."""
    threshold = -500.0 if case.modality == "CT" else 0.08 * np.percentile(case.image, 99.5)
    regions, n = ndimage.label(case.image > threshold)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return float(_world(case, regions == sizes.argmax())[:, 0].mean())


# --- reproducibility -------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_same_seed_gives_identical_arrays_and_another_seed_differs(modality: str) -> None:
    a, b = make_phantom(5, modality), _case(5, modality)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.affine.tobytes() == b.affine.tobytes()
    c = _case(6, modality)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.label.shape != c.label.shape or not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_case_types_shapes_and_defaults(modality: str) -> None:
    case = _case(0, modality)
    assert case.modality == modality
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.ndim == 3 and case.image.shape == case.label.shape
    assert case.affine.shape == (4, 4) and np.array_equal(case.affine[3], [0, 0, 0, 1])
    assert case.annotated == ORGANS
    assert case.case_id == f"phantom_{'ct' if modality == 'CT' else 'mr'}_s0"
    assert set(np.unique(case.label)) == set(range(7))
    assert np.all(np.isfinite(case.image))


def test_one_seed_is_one_patient_seen_by_both_scanners() -> None:
    ct, mr = _case(2, "CT"), _case(2, "MRI")
    for organ in ("liver", "spleen", "kidney_left"):
        volumes = [
            (c.label == PHANTOM_LABELS[organ]).sum() * abs(np.linalg.det(c.affine[:3, :3])) for c in (ct, mr)
        ]
        assert volumes[1] == pytest.approx(volumes[0], rel=0.15)


# --- geometry and anatomy in world coordinates ---------------------------------------------


def test_orientation_codes_differ_and_only_mri_is_oblique() -> None:
    ct, mr = _case(0, "CT"), _case(0, "MRI")
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(mr.affine) == ("R", "A", "S")
    for case, low, high in ((ct, 0.0, 1e-9), (mr, 2.9, 5.1)):
        directions = case.affine[:3, :3] / np.linalg.norm(case.affine[:3, :3], axis=0)
        nearest = np.sign(directions) * (np.abs(directions) == np.abs(directions).max(axis=0))
        tilt = np.degrees(np.arccos(np.clip((np.trace(directions @ nearest.T) - 1) / 2, -1, 1)))
        assert low <= tilt <= high


@pytest.mark.parametrize("modality", ["CT", "MRI"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_organs_sit_on_the_right_sides_in_ras_world(modality: str, seed: int) -> None:
    # RAS+: +x is the patient's Right, +y Anterior, +z Superior (nibabel's convention)
    case = _case(seed, modality)
    for organ in ORGANS:
        assert (case.label == PHANTOM_LABELS[organ]).sum() > 50, organ
    mid = _midline_x(case)
    c = {organ: _centroid(case, organ) for organ in ORGANS}
    assert c["liver"][0] > mid + 20 and c["gallbladder"][0] > mid + 10
    assert c["spleen"][0] < mid - 40
    assert c["kidney_right"][0] > mid + 30 and c["kidney_left"][0] < mid - 30
    assert max(c["kidney_right"][1], c["kidney_left"][1]) < c["liver"][1] - 10  # kidneys posterior
    assert c["spleen"][1] < c["liver"][1]  # spleen posterolateral
    assert c["kidney_left"][2] > c["kidney_right"][2]  # left kidney higher
    assert c["gallbladder"][2] < c["liver"][2] and c["gallbladder"][1] > c["kidney_right"][1]
    pancreas_x = _world(case, case.label == PHANTOM_LABELS["pancreas"])[:, 0]
    assert pancreas_x.min() < mid - 20 and pancreas_x.max() > mid + 10  # crosses the midline


# --- intensities -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_ct_values_are_plausible_hounsfield_units(seed: int) -> None:
    case = _case(seed, "CT")
    image = case.image
    assert image.min() >= -1024 and image.max() <= 3071
    assert np.array_equal(image, np.rint(image))  # integer HU, stored exactly as int16
    corners = image[:5, :5, :]
    assert np.median(corners) < -950  # air
    means = {o: float(image[case.label == PHANTOM_LABELS[o]].mean()) for o in ORGANS}
    assert 40 < means["liver"] < 150 and 30 < means["spleen"] < 160
    assert 20 < means["kidney_right"] < 220 and 20 < means["pancreas"] < 130
    assert -15 < means["gallbladder"] < 40
    assert (image > 300).sum() > 200  # bone
    assert ((image > -150) & (image < -60)).sum() > 0.05 * image.size  # fat


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mri_organ_contrast_is_not_a_rescaled_ct(seed: int) -> None:
    ct, mr = _case(seed, "CT"), _case(seed, "MRI")
    assert mr.image.min() >= 0
    ct_means, mr_means = (
        np.array([c.image[c.label == PHANTOM_LABELS[o]].mean() for o in ORGANS]) for c in (ct, mr)
    )
    liver, spleen, gallbladder = ORGANS.index("liver"), ORGANS.index("spleen"), ORGANS.index("gallbladder")
    assert ct_means[gallbladder] < ct_means[liver]  # bile darker than liver on CT ...
    assert mr_means[gallbladder] > mr_means[spleen] > mr_means[liver]  # ... the brightest on T2
    assert mr_means[liver] == mr_means.min()  # liver darkest on T2, among the brightest on CT
    # a monotonic intensity mapping would keep every pair's order; here at least a third swap
    pairs = [(i, j) for i in range(len(ORGANS)) for j in range(i + 1, len(ORGANS))]
    swapped = sum((ct_means[i] - ct_means[j]) * (mr_means[i] - mr_means[j]) < 0 for i, j in pairs)
    assert swapped >= len(pairs) // 3


# --- written datasets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return out, write_phantom_datasets(out, n_ct=2, n_mri=2, seed=7)


def test_written_datasets_follow_the_nnunet_layout(datasets) -> None:
    out, paths = datasets
    assert paths == [out / CT_DATASET, out / MRI_DATASET]
    for path, channel, prefix in zip(paths, ("CT", "MRI"), ("phantom_ct", "phantom_mr")):
        meta = json.loads((path / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": channel}
        assert meta["labels"] == PHANTOM_LABELS
        assert meta["numTraining"] == 2 and meta["file_ending"] == ".nii.gz"
        assert meta["name"] == path.name and "synthetic" in meta["description"].lower()
        ids = [f"{prefix}_{i:03d}" for i in range(2)]
        assert sorted(p.name for p in (path / "imagesTr").iterdir()) == [f"{i}_0000.nii.gz" for i in ids]
        assert sorted(p.name for p in (path / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
        for case_id in ids:
            assert nib.load(path / "labelsTr" / f"{case_id}.nii.gz").get_data_dtype() == np.uint8
            assert nib.load(path / "imagesTr" / f"{case_id}_0000.nii.gz").get_data_dtype() == np.int16
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_manifest_reproduces_every_case_and_sites_share_no_patient(datasets) -> None:
    _, paths = datasets
    seeds = []
    for path in paths:
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["generator"] == "fedgin.synthetic" and manifest["seed"] == 7
        for entry in manifest["cases"]:
            case = make_phantom(entry["seed"], entry["modality"], case_id=entry["case"])
            image = nib.load(path / entry["image"])
            label = nib.load(path / entry["label"])
            assert np.array_equal(np.asarray(image.dataobj), case.image)
            assert np.array_equal(np.asarray(label.dataobj), case.label)
            assert np.allclose(image.affine, case.affine, atol=1e-4)
            assert entry["shape"] == list(case.image.shape)
            assert entry["spacing"] == pytest.approx(np.linalg.norm(case.affine[:3, :3], axis=0).tolist())
            assert entry["axcodes"] == "".join(nib.aff2axcodes(case.affine))
            assert entry["annotated"] == list(ORGANS)
            seeds.append(entry["seed"])
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("scheme_name", ["abdomen5", "abdomen6"])
def test_written_datasets_open_and_map_to_the_scheme(datasets, scheme_name: str) -> None:
    _, paths = datasets
    scheme = get_scheme(scheme_name)
    for path, modality in zip(paths, ("CT", "MRI")):
        dataset = open_dataset(path, scheme)
        assert dataset.modality == modality and len(dataset.cases) == 2
        for ref in dataset.cases:
            assert ref.annotated == scheme.organs
            image, label, affine = ref.read(scheme)
            assert image.dtype == np.float32 and label.shape == image.shape
            assert set(np.unique(label)) == set(range(scheme.num_classes))
            raw = np.asarray(nib.load(ref.label).dataobj)
            for fine, source_id in PHANTOM_LABELS.items():
                if fine != "background":
                    assert np.all(label[raw == source_id] == scheme.id_of_fine(fine))


def test_mri_partial_marks_pancreas_and_gallbladder_unknown(tmp_path) -> None:
    ct_path, mr_path = write_phantom_datasets(tmp_path, n_ct=1, n_mri=2, seed=3, mri_partial=True)
    manifest = json.loads((mr_path / "manifest.json").read_text())
    assert [e["annotated"] for e in manifest["cases"]] == [list(MRI_PARTIAL_ORGANS)] * 2
    assert json.loads((ct_path / "manifest.json").read_text())["cases"][0]["annotated"] == list(ORGANS)
    expected_by_scheme = {"abdomen6": MRI_PARTIAL_ORGANS, "abdomen5": ("liver", "kidneys", "spleen")}
    for scheme_name, expected in expected_by_scheme.items():
        scheme = get_scheme(scheme_name)
        assert all(ref.annotated == expected for ref in open_dataset(mr_path, scheme).cases)
        assert open_dataset(ct_path, scheme).cases[0].annotated == scheme.organs
    scheme = get_scheme("abdomen6")
    for entry, ref in zip(manifest["cases"], open_dataset(mr_path, scheme).cases):
        _, label, _ = ref.read(scheme)
        full = make_phantom(entry["seed"], "MRI").label
        assert set(np.unique(label)) == {0, 1, 2, 3, 4}
        assert np.all(label[np.isin(full, [5, 6])] == 0)  # stored as 0: unknown
        assert np.array_equal(label[full <= 4], full[full <= 4])


# --- rewriting and bad arguments -------------------------------------------------------------


def test_rewriting_replaces_an_earlier_phantom_dataset(tmp_path) -> None:
    write_phantom_datasets(tmp_path, n_ct=2, n_mri=1, seed=1)
    ct_path, _ = write_phantom_datasets(tmp_path, n_ct=1, n_mri=1, seed=2)
    assert [p.name for p in (ct_path / "imagesTr").iterdir()] == ["phantom_ct_000_0000.nii.gz"]
    assert json.loads((ct_path / "manifest.json").read_text())["seed"] == 2
    assert len(open_dataset(ct_path, get_scheme("abdomen5")).cases) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CT_DATASET, MRI_DATASET]


def test_rewriting_replaces_a_phantom_dataset_of_an_earlier_fedgin(tmp_path) -> None:
    """Datasets written while the generator was ``fedgin.data.phantoms`` may still be replaced."""
    ct_path, mr_path = write_phantom_datasets(tmp_path, n_ct=1, n_mri=1, seed=1)
    for path in (ct_path, mr_path):
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "generator": "fedgin.data.phantoms"}))
    write_phantom_datasets(tmp_path, n_ct=1, n_mri=1, seed=2)
    assert json.loads((ct_path / "manifest.json").read_text())["generator"] == "fedgin.synthetic"


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path) -> None:
    foreign = tmp_path / MRI_DATASET
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a fedgin phantom dataset"):
        write_phantom_datasets(tmp_path, n_ct=1, n_mri=1)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MRI_DATASET]  # nothing else written


def test_a_count_of_zero_writes_one_modality_only(tmp_path, capsys) -> None:
    assert main(["phantoms", "--out", str(tmp_path), "--ct", "2", "--mri", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [CT_DATASET]
    assert write_phantom_datasets(tmp_path / "mr", n_ct=0, n_mri=1) == [tmp_path / "mr" / MRI_DATASET]


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_phantom(0, "PET"),
        lambda: make_phantom(-1, "CT"),
        lambda: make_phantom(1.5, "CT"),
        lambda: write_phantom_datasets("unused", n_ct=0, n_mri=0),
        lambda: write_phantom_datasets("unused", n_mri=-2),
        lambda: write_phantom_datasets("unused", seed=-3),
    ],
)
def test_bad_arguments_are_usage_errors(call, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FedginError):
        call()
    assert not list(tmp_path.iterdir())


def test_modality_aliases() -> None:
    assert make_phantom(0, "MR").modality == "MRI"
    assert np.array_equal(make_phantom(0, "t2").image, _case(0, "MRI").image)
