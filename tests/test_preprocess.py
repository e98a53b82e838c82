"""Preprocessing and its inverse: RAS reorientation, intensity normalisation, the body's plane
(padded to the crop size), and a prediction that lands exactly on the input's voxel grid (shape
and affine)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import SHAPE, phantom_case
from fedgin.data.nifti import read_volume, write_volume
from fedgin.data.preprocess import (
    Geometry,
    PreprocessConfig,
    labels_and_probabilities_from_slices,
    labels_from_slices,
    labels_to_original,
    normalise_intensity,
    BODY_THRESHOLD,
    preprocess,
    probabilities_to_original,
)

NUM_CLASSES = 7  # background + the six source ids of the phantom


def _rotation(degrees: float, axis=(1.0, 2.0, 3.0)) -> np.ndarray:
    """Rotation about ``axis`` (Rodrigues); small angles keep each voxel axis nearest its world axis."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


class Grid:
    """A voxel grid: voxel axis ``a`` points (up to ``degrees`` of obliquity) along world axis
    ``world[a]`` (0 R, 1 A, 2 S) with sign ``sign[a]`` and spacing ``spacing[a]`` mm."""

    def __init__(self, name, world, sign, spacing, degrees=0.0, shape=SHAPE):
        self.name, self.world, self.sign, self.spacing, self.shape = name, world, sign, spacing, shape
        m = np.zeros((3, 3))
        for a in range(3):
            m[world[a], a] = sign[a] * spacing[a]
        self.affine = np.eye(4)
        self.affine[:3, :3] = _rotation(degrees) @ m if degrees else m
        self.affine[:3, 3] = (-31.5, 17.25, -102.0)

    def axis_for(self, ras_axis: int) -> int:
        return self.world.index(ras_axis)

    @property
    def in_plane_spacing(self) -> tuple[float, float]:
        return (self.spacing[self.axis_for(0)], self.spacing[self.axis_for(1)])

    def ras_index(self, ras_axis: int) -> np.ndarray:
        """Index along RAS axis ``ras_axis`` of every voxel of the grid (shape ``self.shape``)."""
        a = self.axis_for(ras_axis)
        idx = np.indices(self.shape)[a]
        return idx if self.sign[a] > 0 else self.shape[a] - 1 - idx


GRIDS = {
    "LPS": Grid("LPS", world=(0, 1, 2), sign=(-1, -1, 1), spacing=(1.5, 1.5, 3.0)),
    "oblique": Grid("oblique", world=(0, 1, 2), sign=(1, 1, 1), spacing=(0.9, 1.4, 4.0), degrees=17.0),
    # sagittal-like: voxel axes point A, S, L; oblique too
    "oblique-permuted": Grid("oblique-permuted", world=(1, 2, 0), sign=(1, -1, -1), spacing=(0.9, 1.4, 4.0),
                             degrees=-11.0),
}


def _written_case(tmp_path: Path, grid: Grid, modality: str = "CT"):
    """Image and label written as NIfTI and read back, as every real input arrives."""
    image, label = phantom_case(grid.shape, modality=modality)
    write_volume(tmp_path / "image.nii.gz", image, grid.affine)
    write_volume(tmp_path / "label.nii.gz", label, grid.affine)
    image, affine = read_volume(tmp_path / "image.nii.gz", kind="image")
    label, label_affine = read_volume(tmp_path / "label.nii.gz", kind="label")
    assert np.array_equal(affine, label_affine)
    return image, label, affine


def test_grids_have_the_intended_orientation():
    assert "".join(nib.aff2axcodes(GRIDS["LPS"].affine)) == "LPS"
    assert "".join(nib.aff2axcodes(GRIDS["oblique"].affine)) == "RAS"
    assert "".join(nib.aff2axcodes(GRIDS["oblique-permuted"].affine)) == "AIL"
    off_axis = np.abs(GRIDS["oblique"].affine[:3, :3]) > 1e-6
    assert off_axis.all()  # truly oblique: every column has components on all three world axes


@pytest.mark.parametrize("slice_size", [(32, 32), (48, 40), (16, 16), (32, 16)], ids=["pad", "pad-more", "smaller",
                                                                                     "pad-and-smaller"])
@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_label_round_trip_is_exact(tmp_path, grid, slice_size):
    """The plane keeps the whole body (here: the whole volume, tissue everywhere), padded to at
    least ``slice_size``: the inverse gives back every label exactly, whatever the crop size."""
    image, label, affine = _written_case(tmp_path, grid)
    cfg = PreprocessConfig(spacing_mm=grid.in_plane_spacing, slice_size=slice_size)

    pre = preprocess(image, affine, "CT", cfg, label)
    n_ras = [grid.shape[grid.axis_for(r)] for r in range(3)]
    assert pre.image.shape == pre.label.shape
    assert pre.image.shape == (n_ras[2], max(n_ras[0], slice_size[0]), max(n_ras[1], slice_size[1]))
    assert pre.geometry.original_shape == grid.shape and pre.geometry.tile == slice_size
    assert np.array_equal(np.array(pre.geometry.original_affine), affine)
    assert pre.labels_outside_body == 0

    back = labels_to_original(pre.label, pre.geometry, NUM_CLASSES)

    assert back.shape == grid.shape and back.dtype == np.uint8
    assert np.array_equal(back, label)

    # a prediction written with the geometry's affine re-reads onto the input grid exactly
    out = write_volume(tmp_path / "pred" / "case.nii.gz", back, np.array(pre.geometry.original_affine),
                       dtype=np.uint8)
    pred, pred_affine = read_volume(out, kind="label")
    assert pred.shape == grid.shape
    assert np.array_equal(pred_affine, affine)
    assert np.array_equal(pred, back)


def _in_air(image: np.ndarray, label: np.ndarray, size: tuple[int, int]):
    """The phantom at the corner of a wider canvas of air (-1000 HU)."""
    wide = np.full((*size, image.shape[2]), -1000, np.int16)
    wide_label = np.zeros(wide.shape, np.uint8)
    wide[:image.shape[0], :image.shape[1]] = image
    wide_label[:image.shape[0], :image.shape[1]] = label
    return wide, wide_label


def test_the_plane_is_the_body_box_and_air_beyond_it_becomes_background():
    image, label = phantom_case(SHAPE)
    wide, wide_label = _in_air(image, label, (60, 56))
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    pre = preprocess(wide, affine, "CT", PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(16, 16)), wide_label)
    # the body (24 x 20 voxels) and a 10 mm margin (7 voxels at 1.5 mm), not the 60 x 56 canvas
    assert pre.image.shape[1:] == (24 + 7, 20 + 7)
    probs = torch.rand(NUM_CLASSES, *pre.label.shape, generator=torch.Generator().manual_seed(0)).softmax(0)

    back = probabilities_to_original(probs, pre.geometry)

    assert back.shape == (NUM_CLASSES, *wide.shape)
    outside = np.zeros(wide.shape, bool)
    outside[31:] = True
    outside[:, 27:] = True
    assert torch.equal(back[0][torch.from_numpy(outside)], torch.ones(int(outside.sum())))
    assert torch.equal(back[1:, torch.from_numpy(outside)], torch.zeros(NUM_CLASSES - 1, int(outside.sum())))
    assert torch.allclose(back.sum(0), torch.ones(wide.shape))
    assert np.array_equal(labels_to_original(pre.label, pre.geometry, NUM_CLASSES), wide_label)


def test_a_label_on_air_widens_the_plane_and_is_counted():
    image, label = phantom_case(SHAPE)
    wide, wide_label = _in_air(image, label, (60, 56))
    wide_label[50:54, 50:54, :] = 1
    pre = preprocess(wide, np.diag([1.5, 1.5, 3.0, 1.0]), "CT",
                     PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(16, 16)), wide_label)
    assert pre.labels_outside_body == 4 * 4 * SHAPE[2]
    assert pre.image.shape[1:] == (54, 54)  # from the body's first voxel to the label's last
    assert np.array_equal(labels_to_original(pre.label, pre.geometry, NUM_CLASSES), wide_label)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_labels_from_slices_in_chunks_equal_the_argmax_of_the_whole_inverse(tmp_path, grid):
    """Prediction inverts batch by batch straight to uint8 labels; chunks of any size give exactly
    the labels of inverting every class's probabilities at once and taking the argmax."""
    image, label, affine = _written_case(tmp_path, grid)
    pre = preprocess(image, affine, "CT", PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(16, 24)), label)
    probs = torch.rand(NUM_CLASSES, *pre.label.shape, generator=torch.Generator().manual_seed(1)).softmax(0)
    whole = probabilities_to_original(probs, pre.geometry).argmax(0).numpy().astype(np.uint8)
    depth = probs.shape[1]
    for size in (1, 2, depth):
        chunks = [(s, probs[:, s:s + size]) for s in range(0, depth, size)]
        labels = labels_from_slices(chunks, pre.geometry)
        assert labels.dtype == np.uint8 and np.array_equal(labels, whole), size
    with pytest.raises(ValueError, match="covered"):
        labels_from_slices([(0, probs[:, :1])], pre.geometry)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_probabilities_from_slices_equal_the_whole_inverse_in_float16(tmp_path, grid):
    """``--save-probabilities`` inverts batch by batch into one float16 array in the input's axis
    order: the whole inverse to float16 precision, with the labels' argmax exactly."""
    image, label, affine = _written_case(tmp_path, grid)
    pre = preprocess(image, affine, "CT", PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(16, 24)), label)
    probs = torch.rand(NUM_CLASSES, *pre.label.shape, generator=torch.Generator().manual_seed(2)).softmax(0)
    whole = probabilities_to_original(probs, pre.geometry).numpy()
    depth = probs.shape[1]
    for size in (1, 2, depth):
        chunks = [(s, probs[:, s:s + size]) for s in range(0, depth, size)]
        labels, back = labels_and_probabilities_from_slices(chunks, pre.geometry)
        assert back.dtype == np.float16 and back.shape == (NUM_CLASSES, *grid.shape), size
        # float16 keeps 11 significant bits: half a step near 1 is 2.4e-4, plus at most one step at a tie
        np.testing.assert_allclose(back.astype(np.float32), whole, rtol=0, atol=1.5e-3)
        assert np.array_equal(labels, labels_from_slices(chunks, pre.geometry)), size
        assert np.array_equal(back.argmax(0), labels), size
    with pytest.raises(ValueError, match="covered"):
        labels_and_probabilities_from_slices([(0, probs[:, :1])], pre.geometry)


def test_a_tie_made_by_float16_rounding_keeps_the_float32_winner(tmp_path):
    """0.40000 and 0.40001 round to the same float16: the saved argmax still names class 2."""
    grid = GRIDS["LPS"]
    image, label, affine = _written_case(tmp_path, grid)
    pre = preprocess(image, affine, "CT", PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32)), label)
    probs = torch.zeros(3, *pre.label.shape)
    probs[0], probs[1], probs[2] = 0.19999, 0.40000, 0.40001
    assert np.float16(0.40000) == np.float16(0.40001)
    labels, back = labels_and_probabilities_from_slices([(0, probs)], pre.geometry)
    assert (labels == 2).all()
    assert (back.argmax(0) == 2).all()
    assert np.allclose(back.astype(np.float32).sum(0), 1.0, atol=2e-3)


@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
def test_resampled_round_trip_keeps_shape_and_a_uniform_label(tmp_path, grid):
    image, _, affine = _written_case(tmp_path, grid)
    label = np.full(grid.shape, 3, dtype=np.uint8)
    pre = preprocess(image, affine, "CT", PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(32, 32)), label)
    assert pre.geometry.resampled_shape != tuple(grid.shape[grid.axis_for(r)] for r in range(2))

    back = labels_to_original(pre.label, pre.geometry, NUM_CLASSES)

    assert back.shape == grid.shape
    assert np.array_equal(back, label)


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_lps_and_ras_copies_of_one_anatomy_preprocess_identically(tmp_path, modality):
    image, label = phantom_case(SHAPE, modality=modality)
    ras_affine = np.diag([1.5, 1.5, 3.0, 1.0])
    ras_affine[:3, 3] = (-20.0, 10.0, 5.0)
    # the same voxels stored with x and y reversed: an LPS grid covering the same space
    lps_affine = ras_affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0],
                                        [0, 0, 0, 1]], dtype=float)
    assert "".join(nib.aff2axcodes(lps_affine)) == "LPS"
    cfg = PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(32, 32))
    write_volume(tmp_path / "ras.nii.gz", image, ras_affine)
    write_volume(tmp_path / "lps.nii.gz", image[::-1, ::-1, :], lps_affine)
    ras_image, ras_aff = read_volume(tmp_path / "ras.nii.gz")
    lps_image, lps_aff = read_volume(tmp_path / "lps.nii.gz")

    ras = preprocess(ras_image, ras_aff, modality, cfg, label)
    lps = preprocess(lps_image, lps_aff, modality, cfg, np.ascontiguousarray(label[::-1, ::-1, :]))

    assert np.array_equal(ras.image, lps.image)
    assert np.array_equal(ras.label, lps.label)
    assert ras.label.max() == 6  # the organs survived resampling


def test_geometry_survives_json():
    image, label = phantom_case(SHAPE)
    grid = GRIDS["oblique-permuted"]
    geometry = preprocess(image.astype(np.float32), grid.affine, "CT", PreprocessConfig(), label).geometry

    assert Geometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry


# --- intensity --------------------------------------------------------------------------------


def test_ct_window_maps_soft_tissue_hu_to_unit_range():
    hu = np.array([-3000.0, -1000.0, -125.0, -25.0, 75.0, 275.0, 276.0, 3000.0], dtype=np.float32)

    out = normalise_intensity(hu, "CT", PreprocessConfig())

    assert out.dtype == np.float32
    assert out.tolist() == [0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0]


def test_ct_window_follows_the_config():
    hu = np.array([-160.0, -60.0, 240.0], dtype=np.float32)
    out = normalise_intensity(hu, "CT", PreprocessConfig(ct_window_hu=(-160.0, 240.0)))
    assert out.tolist() == [0.0, 0.25, 1.0]


def test_ct_volume_preprocesses_into_unit_range_with_padding_zero():
    image = np.linspace(-1200.0, 2000.0, num=int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    cfg = PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32), intensity="unit")

    out = preprocess(image, np.diag([1.5, 1.5, 3.0, 1.0]), "CT", cfg).image

    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.array_equal(out[:, 4:28, 6:26], normalise_intensity(image, "CT", cfg).transpose(2, 0, 1))
    assert not out[:, :4].any() and not out[:, :, :6].any()


def _mri_like(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(SHAPE, dtype=np.float32)  # air
    image[2:22, 2:18] = rng.gamma(2.0, 150.0, size=(20, 16, SHAPE[2]))
    image[5, 5, 2] = 50_000.0  # one hot spot the upper percentile must clip
    return image


def test_mri_percentiles_map_to_unit_range():
    image = _mri_like()
    cfg = PreprocessConfig()

    out = normalise_intensity(image, "MRI", cfg)

    foreground = image[image > 0]
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[image >= hi] == 1.0) and np.all(out[image <= lo] == 0.0)
    np.testing.assert_allclose(out, np.clip((image - lo) / (hi - lo), 0, 1), rtol=0, atol=1e-6)
    assert out[5, 5, 2] == 1.0


@pytest.mark.parametrize("scale", [7.0, 0.01, 1000.0])
def test_mri_normalisation_is_scale_invariant(scale):
    image = _mri_like()
    cfg = PreprocessConfig()

    np.testing.assert_allclose(normalise_intensity(image * np.float32(scale), "MRI", cfg),
                               normalise_intensity(image, "MRI", cfg), rtol=0, atol=1e-6)
    affine = np.diag([1.25, 1.25, 7.7, 1.0])
    ps = PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(16, 16))
    np.testing.assert_allclose(preprocess(image * np.float32(scale), affine, "MRI", ps).image,
                               preprocess(image, affine, "MRI", ps).image, rtol=0, atol=1e-6)


def test_constant_mri_does_not_divide_by_zero():
    out = normalise_intensity(np.full(SHAPE, 42.0, dtype=np.float32), "MRI", PreprocessConfig())
    assert np.all(np.isfinite(out)) and out.max() == 0.0


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_zscore_gives_the_body_mean_zero_and_sd_one_and_air_one_value(modality):
    rng = np.random.default_rng(3)
    image = np.full(SHAPE, -1000.0 if modality == "CT" else 0.0, dtype=np.float32)  # air
    body = rng.normal(40.0, 30.0, size=(20, 16, SHAPE[2])) if modality == "CT" else rng.gamma(2.0, 150.0, (20, 16, SHAPE[2]))
    image[2:22, 2:18] = body
    cfg = PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32))
    assert cfg.intensity == "zscore"

    out = preprocess(image, np.diag([1.5, 1.5, 3.0, 1.0]), modality, cfg).image
    unit = preprocess(image, np.diag([1.5, 1.5, 3.0, 1.0]), modality, replace(cfg, intensity="unit")).image

    inside = out[:, 4 + 2:4 + 22, 6 + 2:6 + 18]  # the body, placed at the padding offsets
    body_voxels = out[unit > BODY_THRESHOLD[modality]]  # the voxels the statistics are taken over
    assert abs(float(body_voxels.mean())) < 1e-3 and abs(float(body_voxels.std()) - 1.0) < 1e-3
    # padding and air share one value, below the body; the map from [0, 1] is one affine map
    assert out[0, 0, 0] == out[:, :4].min() == out.min() and out[0, 0, 0] < inside.mean() - 1
    slope = (out[unit > 0.5] - out[0, 0, 0]) / unit[unit > 0.5]
    np.testing.assert_allclose(slope, slope[0], rtol=1e-4)


def test_old_preprocess_settings_without_intensity_describe_unit_models():
    old = {k: v for k, v in PreprocessConfig().to_dict().items() if k != "intensity"}
    assert PreprocessConfig.from_dict(old).intensity == "unit"
    with pytest.raises(ValueError, match="intensity"):
        PreprocessConfig(intensity="minmax")


def test_preprocess_config_round_trips_through_a_dict():
    cfg = PreprocessConfig(spacing_mm=(1.25, 2.0), slice_size=(96, 128))
    assert cfg.to_dict()["slice_size"] == [96, 128]
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
