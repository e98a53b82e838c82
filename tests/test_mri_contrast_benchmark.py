"""``benchmarks/mri_contrast.py`` on hand-made scans: organ means from the labels (kidneys pooled),
the spleen / liver ratio's z-score within a case's source, and each finished run's Dice on the case
from a grid record."""

import json

import nibabel as nib
import numpy as np

from conftest import benchmark_module


def _case(root, case: str, liver: float, spleen: float) -> None:
    image = np.zeros((8, 8, 2), np.float32)
    label = np.zeros((8, 8, 2), np.uint8)
    label[:2] = 1
    image[:2] = liver
    label[3, :4], label[3, 4:] = 2, 3  # both kidneys: one organ
    image[3] = 600
    label[6:] = 4
    image[6:] = spleen
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4},
        "numTraining": len(list((root / "labelsTr").glob("*.nii.gz")))}))


def test_a_case_whose_spleen_is_as_dark_as_its_liver_stands_out_with_every_runs_dice(tmp_path):
    data = tmp_path / "Dataset802_AbdomenMR"
    for i, spleen in enumerate((700, 720, 680, 710)):
        _case(data, f"chaos_t2_{i:02d}", 350, spleen)
    _case(data, "chaos_t2_15", 140, 140)
    _case(data, "ts_example_mr", 95, 30)  # another source: not in chaos's statistics, no z of its own
    record = tmp_path / "cv3"
    for method, dice in (("fedgin", "0.19"), ("fedavg", "0.0")):
        path = record / f"folds/fold0/runs/complete/{method}/seed0/eval/metrics.csv"
        path.parent.mkdir(parents=True)
        path.write_text("case,dataset,modality,organ,annotated,dice,hd95,missed,false_positive\n"
                        f"chaos_t2_15,D,MRI,liver,True,{dice},117,False,False\n"
                        "chaos_t2_15,D,MRI,pancreas,False,,,False,False\n")
    with benchmark_module("mri_contrast") as module:
        assert module.main(["--data", str(data), "--record", str(record), "--out", str(tmp_path / "out")]) == 0
    cases = json.loads((tmp_path / "out.json").read_text())["cases"]
    odd = cases["chaos_t2_15"]
    assert odd["mean_intensity"] == {"liver": 140.0, "kidneys": 600.0, "spleen": 140.0}
    assert odd["spleen_over_liver"] == 1.0 and odd["ratio_z_vs_others"] < -10
    assert all(abs(cases[f"chaos_t2_{i:02d}"]["ratio_z_vs_others"]) < 3 for i in range(4))
    assert cases["ts_example_mr"]["ratio_z_vs_others"] is None
    assert odd["grid_dice"] == {"fold0/complete/fedgin": {"liver": 0.19}, "fold0/complete/fedavg": {"liver": 0.0}}
    table = (tmp_path / "out.md").read_text()
    assert table.index("chaos_t2_15") < table.index("chaos_t2_00")  # the most unlike first
