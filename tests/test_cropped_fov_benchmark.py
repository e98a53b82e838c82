"""``benchmarks/cropped_fov.py``: the crop window around the organs, the cropped image's affine
(every voxel keeps its place in space), and the script end to end on phantom CT cases with a
small random model."""

import json

import numpy as np
import torch

from conftest import benchmark_module
from fedgin.data.labels import get_scheme
from fedgin.data.preprocess import PreprocessConfig
from fedgin.engine.checkpoint import save_checkpoint
from fedgin.engine.model import ModelConfig, build_model

SCHEME = get_scheme("abdomen5")


def test_the_window_is_centred_on_the_organs_and_clamped_inside_the_image():
    label = np.zeros((100, 80, 3), np.uint8)
    label[60:70, 30:40] = 1  # centre (64.5, 34.5)
    label[5:8, 0:3] = 4  # not asked for: ignored
    with benchmark_module("cropped_fov") as module:
        x, y = module.crop_box(label, np.array([2.0, 2.0, 5.0]), 40.0, [1])
        assert (x.stop - x.start, y.stop - y.start) == (20, 20)
        assert (x.start, y.start) == (54, 24)  # centred on the liver
        edge = np.zeros_like(label)
        edge[90:100, 70:80] = 1
        x, y = module.crop_box(edge, np.array([1.0, 1.0, 5.0]), 40.0, [1])
        assert (x.start, x.stop) == (60, 100) and (y.start, y.stop) == (40, 80)  # clamped at the image's edge
        x, y = module.crop_box(label, np.array([1.0, 1.0, 5.0]), 500.0, [1])
        assert (x.start, x.stop, y.start, y.stop) == (0, 100, 0, 80)  # wider than the image: all of it


def test_a_cropped_voxel_keeps_its_place_in_space():
    affine = np.array([[0.0, -1.5, 0, 10], [1.5, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    window = (slice(7, 30), slice(11, 40))
    with benchmark_module("cropped_fov") as module:
        moved = module.moved_affine(affine, window)
    voxel = np.array([3, 4, 2, 1.0])
    original = voxel + np.array([7, 11, 0, 0])
    assert np.allclose(moved @ voxel, affine @ original)


def test_the_script_scores_whole_and_cropped_cases_on_the_same_voxels(tmp_path, phantom_datasets):
    ct, _ = phantom_datasets(2, 1)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"datasets": {ct.name: {"train": ["phantom_ct_000"], "test": ["phantom_ct_001"]}}}))
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(4, 8, 16, 32), out_channels=SCHEME.num_classes)
    model = save_checkpoint(tmp_path / "model.pt", build_model(cfg).state_dict(), model_config=cfg, scheme=SCHEME,
                            preprocess=PreprocessConfig(), sites=[{"name": "ct", "modality": "CT"}],
                            meta={"epoch": 1, "seed": 0, "split": str(split)})
    out = tmp_path / "crop.json"
    with benchmark_module("cropped_fov") as module:
        result = module.main(["--model", str(model), "--data", str(ct), "--fov", "120", "--out", str(out)])
    assert json.loads(out.read_text())["fov_mm"] == 120.0
    cases = {c["case"]: c for c in result["cases"]}
    assert set(cases) == {"phantom_ct_000", "phantom_ct_001"}
    assert cases["phantom_ct_000"]["role"] == "train" and cases["phantom_ct_001"]["role"] == "test"
    for case in cases.values():
        assert all(w < s for w, s in zip(case["window_voxels"], case["shape"][:2]))  # cropped in-plane
        for organ in case["organs"].values():
            assert 0 < organ["share_inside_window"] <= 1
            for key in ("dice_whole", "dice_cropped"):
                assert organ[key] is None or 0.0 <= organ[key] <= 1.0
    assert set(result["mean_over_organ_cases"]) == {"all", "train", "val", "test"}
