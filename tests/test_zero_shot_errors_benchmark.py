"""``benchmarks/zero_shot_errors.py``: where an organ's voxels go (missed, confused, placed far), the
missed voxels' probability and the empty slices, on hand-made label maps; and the script end to
end on a phantom dataset with a small random model."""

import json

import numpy as np
import pytest
import torch

from conftest import benchmark_module
from fedgin.data.labels import get_scheme
from fedgin.data.preprocess import PreprocessConfig
from fedgin.engine.checkpoint import save_checkpoint
from fedgin.engine.model import ModelConfig, build_model

SCHEME = get_scheme("abdomen5")
ORGANS = {o: i for o, i in SCHEME.label_ids.items() if i > 0}
LIVER, KIDNEYS, SPLEEN = (SCHEME.label_ids[o] for o in ("liver", "kidneys", "spleen"))


def test_the_breakdown_tells_a_miss_from_a_confusion_and_a_far_blob():
    reference = np.zeros((20, 20, 4), np.uint8)
    reference[2:10, 2:10] = LIVER  # 256 voxels over 4 slices
    reference[12:16, 12:16] = SPLEEN  # 64 voxels
    pred = np.zeros_like(reference)
    pred[2:10, 2:6] = LIVER  # half the liver found, half missed
    pred[12:16, 12:14] = KIDNEYS  # half the spleen called kidneys
    pred[18:20, 0:2] = SPLEEN  # a far spleen blob of 16 voxels
    pred[0:2, 18:20, 0] = SCHEME.label_ids["pancreas"]  # pancreas where the case does not annotate it: background on the precision side
    probs = np.zeros((SCHEME.num_classes, *reference.shape), np.float16)
    probs[LIVER, 2:10, 6:8] = 0.4  # a quarter of the liver (half its misses) nearly found
    pred[..., 3] = np.where(reference[..., 3] == LIVER, 0, pred[..., 3])  # the liver's last slice left empty
    with benchmark_module("zero_shot_errors") as module:
        errors = module.case_errors(pred, reference, ORGANS, {"liver", "kidneys", "spleen"}, probs, slice_axis=2)
    liver, spleen = errors["recall"]["liver"], errors["recall"]["spleen"]
    assert liver["liver"] == pytest.approx(0.375) and liver["background"] == pytest.approx(0.625)
    assert spleen["kidneys"] == pytest.approx(0.5) and spleen["background"] == pytest.approx(0.5)
    assert spleen["spleen"] == 0 and sum(spleen.values()) == pytest.approx(1.0)
    assert errors["dice"]["liver"] == pytest.approx(2 * 96 / (96 + 256))
    assert errors["volume_ratio"]["spleen"] == pytest.approx(16 / 64)
    assert errors["far_share"]["spleen"] == 1.0 and errors["far_share"]["liver"] == 0.0
    assert errors["precision"]["kidneys"] == {"background": 0.0, "liver": 0.0, "kidneys": 0.0, "spleen": 1.0}
    assert errors["precision"]["spleen"]["background"] == 1.0
    assert "pancreas" not in errors["precision"] and "pancreas" not in errors["recall"]
    missed = 256 - 96  # liver voxels called background; 8 x 2 x 4 of them have p 0.4
    assert errors["missed_near_share"]["liver"] == pytest.approx(64 / missed)
    assert errors["missed_probability"]["liver"] == pytest.approx(0.4 * 64 / missed, abs=1e-3)
    assert errors["empty_slice_share"]["liver"] == pytest.approx(0.25)
    assert errors["empty_slice_share"]["spleen"] == 0.0  # the far blob sits on each of its slices


def test_the_script_scores_a_models_test_cases_and_writes_its_tables(tmp_path, make_nnunet):
    data = make_nnunet("Dataset002_MR", cases=[f"case_{i:03d}" for i in range(4)], modality="MRI")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"datasets": {data.name: {"train": ["case_000", "case_001"], "val": ["case_002"],
                                                          "test": ["case_003"]}}}))
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(4, 8, 16, 32), out_channels=SCHEME.num_classes)
    model = save_checkpoint(tmp_path / "model.pt", build_model(cfg).state_dict(), model_config=cfg, scheme=SCHEME,
                            preprocess=PreprocessConfig(), sites=[{"name": "ct", "modality": "CT"}],
                            meta={"epoch": 1, "seed": 0, "split": str(split)})
    with benchmark_module("zero_shot_errors") as module:
        assert module.main(["--model", f"random={model}", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    scored = result["models"]["random"]
    assert [c["case"] for c in scored["per_case"]] == ["case_003"]  # the test split only
    for row in scored["mean"]["recall"].values():
        assert sum(row.values()) == pytest.approx(1.0)
    assert "## random (1 cases)" in (tmp_path / "out.md").read_text()
