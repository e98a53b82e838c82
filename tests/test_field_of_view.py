"""The whole field of view: preprocessing keeps the patient's whole body whatever the scanner's
field of view, training crops reach every labelled voxel, prediction covers the whole plane in
tiles, and a patient lying off-centre in a wide field is segmented like the same patient centred.
Training reads its slices from the cache on disk (memory does not grow with the site)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_sites
from fedgin.config import SiteSpec, resolve
from fedgin.data.cache import load_case
from fedgin.data.check import check_datasets, warning_lines
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import read_volume, write_volume
from fedgin.data.npy import DamagedArray, NpyVolume
from fedgin.data.preprocess import PreprocessConfig, preprocess
from fedgin.data.sites import CaseData, load_site
from fedgin.engine.inference import iter_probs, predict_labels
from fedgin.engine.model import build_model
from fedgin.engine.sampling import SliceIndex, crop_origin
from fedgin.engine.trainer import Trainer
from fedgin.engine.metrics import dice_score

SCHEME = get_scheme("abdomen5")
QUICK = PreprocessConfig()  # 2.5 mm, 128 x 128 crops: a 320 mm window


def wide_canvas(image: np.ndarray, label: np.ndarray, affine: np.ndarray, size_mm: float,
                corner: tuple[int, int], air: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``image``/``label`` placed at in-plane voxel ``corner`` of an air canvas ``size_mm`` wide
    (the same spacing and slices), with the affine that keeps the patient where it was in space."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    n = [int(np.ceil(size_mm / spacing[a])) for a in (0, 1)]
    assert all(c + s <= m for c, s, m in zip(corner, image.shape[:2], n)), "the patient must fit"
    big = np.full((n[0], n[1], image.shape[2]), air, dtype=image.dtype)
    big_label = np.zeros(big.shape, np.uint8)
    region = (slice(corner[0], corner[0] + image.shape[0]), slice(corner[1], corner[1] + image.shape[1]))
    big[region], big_label[region] = image, label
    moved = affine.copy()
    moved[:3, 3] -= affine[:3, :3] @ np.array([corner[0], corner[1], 0.0])
    return big, big_label, moved


@pytest.fixture(scope="module")
def ct_case(phantom_datasets):
    """A phantom CT case (image in HU, scheme label, affine) and its dataset."""
    ct, _ = phantom_datasets(2, 1)
    ref = open_dataset(ct, SCHEME).cases[0]
    image, label, affine = ref.read(SCHEME)
    return image, label, affine


def test_an_off_centre_patient_in_a_525_mm_field_gives_the_plane_of_the_centred_one(ct_case):
    image, label, affine = ct_case
    centred = preprocess(image, affine, "CT", QUICK, label)
    big, big_label, moved = wide_canvas(image, label, affine, 525.0, (0, 3), air=-1024)
    assert big.shape[0] * np.linalg.norm(affine[:3, 0]) >= 525
    off = preprocess(big, moved, "CT", QUICK, big_label)

    assert off.image.shape == centred.image.shape
    assert off.image.shape[1] >= 128 and off.image.shape[2] >= 128
    # the same body, up to the in-plane resampling's phase: labels agree, images nearly
    assert dice_score(off.label > 0, centred.label > 0) > 0.95
    assert np.abs(off.image - centred.image).mean() < 0.1
    assert off.geometry.tile == (128, 128)
    assert off.labels_outside_body == centred.labels_outside_body == 0


def test_nothing_labelled_outside_a_320_mm_window_is_lost(ct_case):
    """A patient wider than the old fixed window: every labelled voxel reaches the plane, and the
    inverse puts the labels back exactly."""
    from fedgin.data.preprocess import labels_to_original

    image, label, affine = ct_case
    big, big_label, moved = wide_canvas(image, label, affine, 525.0, (0, 0), air=-1024)
    # a body part far from the centre: tissue and a labelled organ at the canvas's far corner
    far = (slice(big.shape[0] - 40, big.shape[0] - 4), slice(big.shape[1] - 40, big.shape[1] - 4), slice(None))
    big[far] = 40
    big_label[far] = SCHEME.label_ids["spleen"]
    spacing = np.linalg.norm(moved[:3, :3], axis=0)
    centre = np.array(big.shape[:2]) / 2
    window = 320.0 / spacing[:2] / 2
    corner = np.array([big.shape[0] - 5, big.shape[1] - 5])
    assert (np.abs(corner - centre) > window).any(), "the far corner lies outside the old window"

    pre = preprocess(big, moved, "CT", QUICK, big_label)
    assert pre.image.shape[1] > 128 or pre.image.shape[2] > 128
    back = labels_to_original(pre.label, pre.geometry, SCHEME.num_classes)
    assert dice_score(back == SCHEME.label_ids["spleen"], big_label == SCHEME.label_ids["spleen"]) > 0.97
    assert (back[far] == SCHEME.label_ids["spleen"]).mean() > 0.97


def test_training_crops_reach_every_labelled_voxel_of_a_wide_plane():
    plane = np.zeros((1, 200, 200), np.uint8)
    plane[0, 180:195, 3:12] = 3  # a small organ in a corner, far outside a centred 128 crop
    plane[0, 60:140, 60:140] = 1  # a big one in the middle
    image = np.zeros(plane.shape, np.float32)
    case = CaseData("c", "CT", image, plane, np.ones(SCHEME.num_classes, bool), None, None)
    index = SliceIndex([case])
    rng = np.random.default_rng(0)
    seen = np.zeros(plane.shape[1:], bool)
    for _ in range(200):
        r0, c0 = crop_origin(plane[0], (128, 128), rng)
        assert 0 <= r0 <= 72 and 0 <= c0 <= 72
        seen[r0:r0 + 128, c0:c0 + 128] = True
    assert seen[plane[0] > 0].all()
    # an organ is drawn uniformly: the small one is in about half of the crops
    hits = sum(bool((index.read(np.array([0]), (128, 128), rng)[1] == 3).any()) for _ in range(200))
    assert 70 < hits < 200, hits
    # a slice without organs: uniform positions anywhere in the plane
    empty = np.zeros((200, 200), np.uint8)
    origins = np.array([crop_origin(empty, (128, 128), rng) for _ in range(300)])
    assert origins.min() == 0 and origins.max() == 72


def test_a_plane_smaller_than_the_crop_is_refused():
    with pytest.raises(ValueError, match="smaller than"):
        crop_origin(np.zeros((100, 140), np.uint8), (128, 128), np.random.default_rng(0))


def test_prediction_covers_a_wide_plane_in_tiles():
    torch.manual_seed(0)
    model = build_model(resolve("quick", command="test", out="", sites=()).model)
    image = np.random.default_rng(0).normal(size=(3, 200, 176)).astype(np.float32)
    (start, probs), = list(iter_probs(model, image, torch.device("cpu"), tile=(128, 128)))
    assert start == 0 and probs.shape == (SCHEME.num_classes, 3, 200, 176)
    assert torch.allclose(probs.sum(0), torch.ones(3, 200, 176), atol=1e-5)
    # a plane of the tile's size is one window: the same as the model on the whole plane
    small = image[:, :128, :128]
    (_, tiled), = list(iter_probs(model, small, torch.device("cpu"), tile=(128, 128)))
    (_, whole), = list(iter_probs(model, small, torch.device("cpu"), tile=None))
    assert torch.equal(tiled, whole)


def _nifti_case(folder: Path, image, label, affine) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return (write_volume(folder / "img.nii.gz", image, affine, dtype=np.int16),
            write_volume(folder / "lab.nii.gz", label, affine, dtype=np.uint8))


def test_an_off_centre_patient_is_segmented_like_the_centred_one(ct_case, tmp_path):
    """A model trained a little on the phantom; the same scan centred and at the corner of a 525 mm
    field: the two label maps agree (Dice >= 0.9 per organ predicted) once each is mapped back."""
    image, label, affine = ct_case
    cfg = resolve("quick", command="test", out="", sites=())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    pre = preprocess(image, affine, "CT", cfg.preprocess, label)
    case = CaseData("c", "CT", pre.image, pre.label, np.ones(SCHEME.num_classes, bool), pre.geometry, None)
    train = Trainer(model, replace(cfg.train, steps_per_epoch=40, batch_size=4, gin=False, validate=False, lr=3e-3),
                    SCHEME, torch.device("cpu"), seed=0)
    train.fit([case], 1)

    big, big_label, moved = wide_canvas(image, label, affine, 525.0, (0, 3), air=-1024)
    centred = predict_labels(model, pre, torch.device("cpu"))
    off_pre = preprocess(big, moved, "CT", cfg.preprocess)
    off = predict_labels(model, off_pre, torch.device("cpu"))
    assert off.shape == big.shape
    placed = off[0:image.shape[0], 3:3 + image.shape[1]]
    assert (off.sum() == placed.sum()), "nothing predicted in the air around the patient"
    predicted = [i for i in np.unique(centred) if i > 0]
    assert predicted, "the trained model predicts some organ"
    for i in predicted:
        assert dice_score(placed == i, centred == i) >= 0.9, i


def test_data_check_warns_about_labels_outside_the_body(make_nnunet, capsys):
    from fedgin.cli import main

    root = make_nnunet("Dataset001_Site")
    label_path = sorted((root / "labelsTr").glob("*.nii.gz"))[0]
    image_path = root / "imagesTr" / (label_path.name[:-len(".nii.gz")] + "_0000.nii.gz")
    image, affine = read_volume(image_path, kind="image")
    label, _ = read_volume(label_path, kind="label")
    wide = np.full((80, 80, image.shape[2]), -1000, np.int16)
    wide[:image.shape[0], :image.shape[1]] = image
    wide_label = np.zeros(wide.shape, np.uint8)
    wide_label[:label.shape[0], :label.shape[1]] = label
    wide_label[70:75, 70:75, :] = 1  # a "liver" painted on air, far from the body
    write_volume(image_path, wide, affine, dtype=np.int16)
    write_volume(label_path, wide_label, affine, dtype=np.uint8)

    rows, errors = check_datasets([str(root)], SCHEME)
    assert not errors
    warned = warning_lines(rows)
    assert len(warned) == 1 and label_path.name[:-len(".nii.gz")] in warned[0]
    assert f"{5 * 5 * image.shape[2]} labelled voxel(s)" in warned[0]
    assert main(["data", "check", str(root)]) == 0
    err = capsys.readouterr().err
    assert "fedgin: warning:" in err and "outside the body" in err


# --- training from the cache on disk --------------------------------------------------------------

def test_cache_entries_are_npy_files_read_a_slice_at_a_time(phantom_datasets, tmp_path):
    ct, _ = phantom_datasets(2, 1)
    ref = open_dataset(ct, SCHEME).cases[0]
    pre = load_case(ref, SCHEME, QUICK, tmp_path, in_memory=False)
    assert isinstance(pre.image, NpyVolume) and isinstance(pre.label, NpyVolume)
    whole = load_case(ref, SCHEME, QUICK, tmp_path)
    assert isinstance(whole.image, np.ndarray)
    assert np.array_equal(pre.image[3], whole.image[3]) and np.array_equal(pre.label[2:5], whole.label[2:5])
    assert np.array_equal(np.asarray(pre.image), whole.image)
    assert np.array_equal(pre.organ_slices, (whole.label.reshape(len(whole.label), -1) > 0).any(1))
    # a truncated array is found damaged and the entry recomputed
    entry = Path(pre.image.path).parent
    data = (entry / "image.npy").read_bytes()
    (entry / "image.npy").write_bytes(data[:-100])
    with pytest.raises(DamagedArray):
        NpyVolume.open(entry / "image.npy")
    again = load_case(ref, SCHEME, QUICK, tmp_path)
    assert np.array_equal(again.image, whole.image)
    assert json.loads((entry / "meta.json").read_text())["format"] == 2


def test_training_never_loads_a_whole_training_case(phantom_datasets, tmp_path, monkeypatch):
    """The trainer reads the slices of each batch; a whole training volume is never read (its
    validation cases are, one at a time)."""
    ct, _ = phantom_datasets(3, 1)
    site = load_site("ct", str(ct), SCHEME, QUICK, cache_dir=tmp_path)
    assert all(isinstance(c.image, NpyVolume) for c in site.train)
    reads = []
    original = NpyVolume.read

    def counting(self, start, stop):
        reads.append((self.path, stop - start))
        return original(self, start, stop)

    monkeypatch.setattr(NpyVolume, "read", counting)
    cfg = resolve("quick", command="test", out="", sites=())
    trainer = Trainer(build_model(cfg.model), replace(cfg.train, steps_per_epoch=3, validate=False),
                      SCHEME, torch.device("cpu"), seed=0)
    trainer.fit(site.train, 1)
    assert reads and max(n for _, n in reads) == 1
    # image + label of each slice of each step
    assert len(reads) == 2 * 3 * trainer.slices_per_step


def test_streamed_and_in_memory_cases_train_the_same(phantom_datasets, tmp_path):
    """Streaming changes nothing in what is learnt: in-memory arrays and on-disk volumes give the
    same weights after the same steps."""
    ct, = copy_sites(phantom_datasets(2, 1)[:1], tmp_path / "data")
    site = load_site("ct", str(ct), SCHEME, QUICK, cache_dir=tmp_path / "cache")
    in_memory = [CaseData(c.case_id, c.modality, np.asarray(c.image), np.asarray(c.label), c.annotated,
                          c.geometry, c.ref) for c in site.train]
    cfg = resolve("quick", command="test", out="", sites=(SiteSpec("ct", str(ct)),))
    train_cfg = replace(cfg.train, steps_per_epoch=2, validate=False)
    weights = []
    for cases in (site.train, in_memory):
        torch.manual_seed(0)
        trainer = Trainer(build_model(cfg.model), train_cfg, SCHEME, torch.device("cpu"), seed=0)
        trainer.fit(cases, 1)
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
