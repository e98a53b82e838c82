"""The QA page (``qa.html``), its stored images (``qa.npz``) and the organ statistics: unit tests
on tiny arrays, the commands that write them (``predict``, ``evaluate``, ``report``) on tiny
NIfTI datasets with an untrained checkpoint, and one test of the page in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from chromium import Browser, find_chromium
from conftest import ABDOMEN_LABELS
from test_bad_input import make_checkpoint
from test_evaluate_pred import cli, copy_references, summary_of
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import read_volume, write_volume
from fedgin.evaluation.qa import read_mosaic, webp_mosaic
from fedgin.evaluation.qa_views import (
    CT_CODES,
    MAX_VOXELS,
    MAX_VOXELS_PER_AXIS,
    MIN_VOXELS,
    PAGE_VOXELS,
    ViewWriter,
    block_factors,
    case_view,
    case_voxels,
    encode,
    read_views,
)
from fedgin.evaluation.statistics import case_statistics, organ_statistics, plausibility_warnings

ABDOMEN5 = get_scheme("abdomen5")
REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("FEDGIN_TEST_ARTEFACTS", REPO / "build" / "test-artefacts"))
CASES = ("case_000", "case_001", "case_002")


# --- statistics ---------------------------------------------------------------------------------


def test_organ_volumes_are_in_ml_and_intensities_are_taken_inside_the_organ():
    affine = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm^3 = 0.02 ml per voxel
    labels = np.zeros((10, 10, 4), dtype=np.uint8)
    labels[:5, :5, :2] = ABDOMEN5.label_ids["liver"]  # 50 voxels: 1 ml
    labels[6:8, 6:8, 0] = ABDOMEN5.label_ids["spleen"]  # 4 voxels
    image = np.full(labels.shape, -1000.0, dtype=np.float32)
    image[:5, :5, 0], image[:5, :5, 1] = 50.0, 70.0  # liver: mean 60 HU, sd 10
    stats = organ_statistics(labels, image, affine, ABDOMEN5)
    assert stats["liver"]["voxels"] == 50 and stats["liver"]["volume_ml"] == pytest.approx(1.0)
    assert stats["liver"]["mean"] == pytest.approx(60.0) and stats["liver"]["sd"] == pytest.approx(10.0)
    assert stats["spleen"]["mean"] == pytest.approx(-1000.0) and stats["spleen"]["sd"] == 0.0
    assert stats["pancreas"] == {"voxels": 0, "volume_ml": 0.0, "mean": None, "sd": None}
    reference = np.zeros_like(labels)
    reference[:5, :5, :4] = ABDOMEN5.label_ids["liver"]
    case = case_statistics("c", "CT", labels, image, affine, ABDOMEN5, reference)
    assert case["organs"]["liver"]["reference_ml"] == pytest.approx(2.0)
    assert case["intensity"] == "HU" and case["voxel_ml"] == pytest.approx(0.02)
    assert set(case["organs"]) == set(ABDOMEN5.organs)


def test_plausibility_warnings_name_only_organs_far_outside_the_adult_range():
    volumes = {"liver": 500.0, "kidneys": 300.0, "spleen": 1500.0, "pancreas": 0.0, "gallbladder": 2.54}
    warnings = plausibility_warnings({o: {"volume_ml": ml} for o, ml in volumes.items()})
    assert warnings == ["liver 500 ml, far below the usual adult range of 800-3000 ml",
                        "spleen 1500 ml, far above the usual adult range of 50-1000 ml",
                        "pancreas not found (0 ml), outside the usual adult range of 30-150 ml",
                        "gallbladder 2.5 ml, far below the usual adult range of 5-150 ml"]
    assert plausibility_warnings({"gallbladder": {"volume_ml": 20.0}, "liver": {"volume_ml": 800.0}}) == []
    # abdomen6 checks each kidney on its own range
    assert plausibility_warnings({"kidney_left": {"volume_ml": 150.0}, "kidney_right": {"volume_ml": 20.0}}) == [
        "kidney_right 20 ml, far below the usual adult range of 70-300 ml"]


# --- the stored images --------------------------------------------------------------------------


def test_views_are_turned_to_ras_down_sampled_and_coded():
    image = np.zeros((400, 6, 5), dtype=np.float32)  # LPS: voxel x 0 is the patient's right
    image[:1] = 40.0  # a bright band at the patient's right edge
    pred = np.zeros(image.shape, dtype=np.uint8)
    pred[:1, :, 4] = 1  # ... labelled on the most superior slice
    affine = np.diag([-0.5, -2.0, 3.0, 1.0])
    arrays, meta = case_view(image, affine, "CT", pred)
    assert arrays["image"].shape == (5, 6, 134)  # Z x Y x X; 400 / 3 rounded up along x
    assert meta["spacing"] == [3.0, 2.0, 1.5]
    code_40 = encode(np.array([40.0]), *CT_CODES)[0]
    assert code_40 == 120 and encode(np.array([0.0]), *CT_CODES)[0] == 107
    assert (arrays["image"][:, :, -1] == code_40).all()  # the right edge is the last x (RAS)
    assert (arrays["image"][:, :, :-1] == 107).all()
    assert arrays["pred"][4, :, -1].all() and arrays["pred"].sum() == 6 and "ref" not in arrays
    for shape, spacing in (((512, 512, 400), (0.8, 0.8, 1.0)), ((256, 256, 30), (1.5, 1.5, 6.0))):
        factors = block_factors(shape, spacing)
        kept = [-(-n // f) for n, f in zip(shape, factors)]
        assert max(kept) <= MAX_VOXELS_PER_AXIS and np.prod(kept) <= MAX_VOXELS
    assert block_factors((256, 256, 30), (1.5, 1.5, 6.0)) == (2, 2, 1)


def test_a_page_of_many_cases_keeps_each_coarser_within_its_share():
    assert case_voxels(None) == case_voxels(1) == case_voxels(32) == MAX_VOXELS
    assert case_voxels(50) == PAGE_VOXELS // 50 < MAX_VOXELS
    assert case_voxels(10_000) == MIN_VOXELS
    shape, spacing = (512, 512, 600), (0.8, 0.8, 1.0)  # a full-size CT
    for cases in (1, 50, 500):
        kept = [-(-n // f) for n, f in zip(shape, block_factors(shape, spacing, case_voxels(cases)))]
        assert max(kept) <= MAX_VOXELS_PER_AXIS and np.prod(kept) <= case_voxels(cases)
    image = np.random.default_rng(0).normal(40, 20, (60, 50, 40)).astype(np.float32)
    arrays, _ = case_view(image, np.eye(4), "CT", np.zeros(image.shape, np.uint8), max_voxels=20_000)
    assert arrays["image"].size <= 20_000 and arrays["pred"].shape == arrays["image"].shape


def test_the_scan_goes_on_the_page_as_one_webp_picture_close_to_its_codes():
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[0:37, 0:50, 0:61]
    codes = np.clip(100 + 60 * np.sin(x / 7.0) * np.cos(y / 9.0) + z + rng.normal(0, 4, z.shape), 0, 255)
    codes = codes.astype(np.uint8)
    text, columns = webp_mosaic(codes)
    assert columns == 6  # near square: 6 x 61 = 366 wide, 7 x 50 = 350 high
    back = read_mosaic(text, codes.shape, columns)
    error = np.abs(back.astype(int) - codes)
    assert error.mean() < 2.0 and np.percentile(error, 99) <= 8, (error.mean(), error.max())
    assert len(text) < 0.5 * codes.size  # lossy: well under the zlib'd codes' ~0.8 byte a voxel


def test_qa_npz_holds_each_case_in_page_order(tmp_path):
    writer = ViewWriter(tmp_path / "qa.npz")
    cases = [({"image": np.full((2, 3, 4), i, np.uint8), "pred": np.eye(4, dtype=np.uint8)[None]}, {"case": f"c{i}"})
             for i in range(2)]
    for arrays, meta in cases:
        writer.add(arrays, meta)
    assert list(tmp_path.iterdir()) != [tmp_path / "qa.npz"]  # only a temporary file until closed
    writer.close()
    read = list(read_views(tmp_path / "qa.npz"))
    assert [m for m, _ in read] == [m for _, m in cases]
    for (_, got), (want, _) in zip(read, cases):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


# --- the commands -------------------------------------------------------------------------------


def page_data(html: Path) -> dict:
    text = html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must load nothing from outside"
    return json.loads(re.search(r'<script type="application/json" id="qa-data">(.*?)</script>', text).group(1))


def test_predict_writes_statistics_and_the_qa_page_and_report_redraws_it(make_nnunet, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model.pt")
    root = make_nnunet("Dataset031_QA", cases=CASES[:2])
    pred = tmp_path / "pred"
    rc, out, err = cli(capsys, "predict", "-i", root / "imagesTr", "-o", pred, "--model", model, "--statistics")
    assert rc == 0, err
    for case in CASES[:2]:
        stats = json.loads((pred / f"{case}.statistics.json").read_text())
        labels, affine = read_volume(pred / f"{case}.nii.gz", kind="label")
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        assert stats["organs"]["liver"]["volume_ml"] == pytest.approx((labels == 1).sum() * voxel_ml)
        assert stats["modality"] == "CT" and stats["warnings"]  # tiny phantoms: every organ is implausible
        assert f"{case}: plausibility warning: " in out
    data = page_data(pred / "qa.html")
    assert data["kind"] == "prediction" and [c["case"] for c in data["cases"]] == list(CASES[:2])
    assert [c["view_index"] for c in data["cases"]] == [0, 1] and "qa-v1-pred" in (pred / "qa.html").read_text()
    assert dict(data["provenance"])["checkpoint SHA-256"] == json.loads(
        (pred / "provenance.json").read_text())["checkpoint"]["sha256"]
    (pred / "qa.html").unlink()
    (pred / "qa.npz").unlink()
    rc, out, err = cli(capsys, "report", pred)  # the images are read again from the inputs
    assert rc == 0, err
    assert out.strip() == f"wrote {pred / 'qa.html'}" and (pred / "qa.npz").is_file()
    assert page_data(pred / "qa.html")["cases"] == data["cases"]
    bare = tmp_path / "bare"
    assert cli(capsys, "predict", "-i", root / "imagesTr", "-o", bare, "--model", model, "--no-qa")[0] == 0
    assert sorted(p.name for p in bare.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz", "labels.json",
                                                      "provenance.json"]


def test_evaluate_writes_statistics_always_and_the_qa_page_by_default(make_nnunet, tmp_path, capsys):
    model = make_checkpoint(tmp_path / "model.pt")
    root = make_nnunet("Dataset032_QA", cases=CASES[:2])
    out = tmp_path / "eval"
    rc, stdout, err = cli(capsys, "evaluate", "--model", model, "--data", root, "--out", out, "--cases", "all")
    assert rc == 0, err
    assert "statistics/, qa.html; 2 case(s) with plausibility warnings" in stdout
    records = summary_of(out)["metric_per_case"]
    for record in records:
        written = json.loads((out / "statistics" / f"{record['case']}.statistics.json").read_text())
        assert written == {"dataset": record["dataset"], **record["statistics"]}
        reference, _ = read_volume(root / "labelsTr" / f"{record['case']}.nii.gz", kind="label")
        assert record["statistics"]["organs"]["liver"]["reference_ml"] == pytest.approx(
            (reference == ABDOMEN_LABELS["liver"]).sum() * 1.5 * 1.5 * 3.0 / 1000)
    data = page_data(out / "qa.html")
    assert [c["case"] for c in data["cases"]] == [r["case"] for r in records]
    assert all(c["view"]["has_ref"] for c in data["cases"])
    assert dict(data["provenance"])["post-processing plan"].startswith("none")
    html = (out / "qa.html").read_text()
    for index, (_, arrays) in enumerate(read_views(out / "qa.npz")):  # the page shows what qa.npz keeps
        found = re.search(rf'<script type="text/plain" id="qa-v{index}-image" data-columns="(\d+)">(.*?)</script>', html)
        shown = read_mosaic(found.group(2), arrays["image"].shape, int(found.group(1)))
        assert np.abs(shown.astype(int) - arrays["image"]).mean() < 2.0
        label = re.search(rf'id="qa-v{index}-ref">(.*?)</script>', html).group(1)
        assert np.array_equal(np.frombuffer(zlib.decompress(base64.b64decode(label)), np.uint8),
                              arrays["ref"].ravel())  # labels exactly
    (out / "qa.html").unlink()
    rc, stdout, err = cli(capsys, "report", out)
    assert rc == 0 and stdout.strip() == f"wrote {out / 'qa.html'}", err
    assert page_data(out / "qa.html")["cases"] == data["cases"]
    bare = tmp_path / "bare"
    assert cli(capsys, "evaluate", "--model", model, "--data", root, "--out", bare, "--cases", "all",
               "--no-qa")[0] == 0
    assert sorted(p.name for p in bare.iterdir()) == ["metrics.csv", "statistics", "summary.json", "summary.md"]


# --- the page in a browser ------------------------------------------------------------------------

PIXELS = """(() => {
  const c = document.getElementById('view'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let hash = 0, lit = 0;
  for (let i = 0; i < d.length; i += 4) {
    hash = (Math.imul(hash, 31) + d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7) >>> 0;
    if (d[i] + d[i + 1] + d[i + 2] > 30) lit++;
  }
  return {hash, lit, total: d.length / 4, width: c.width, height: c.height};
})()"""


def choose(control: str, value: str) -> str:
    return (f"(() => {{ const s = document.getElementById('{control}'); s.value = '{value}'; "
            f"s.dispatchEvent(new Event('change')); return s.value; }})()")


@pytest.mark.slow
def test_the_page_works_in_headless_chromium(make_nnunet, tmp_path, capsys):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium (/usr/bin/chromium; on Debian: apt-get install -y chromium, or set "
                    "FEDGIN_CHROMIUM): the QA page's browser test needs a real browser")
    root = make_nnunet("Dataset033_QA", cases=CASES)
    pred = copy_references(root, tmp_path / "pred")
    for case in CASES[1:]:  # two cases lose their liver: they are the worst and come first
        labels, affine = read_volume(pred / f"{case}.nii.gz", kind="label")
        write_volume(pred / f"{case}.nii.gz", np.where(labels == ABDOMEN_LABELS["liver"], 0, labels), affine,
                     dtype=np.uint8)
    out = tmp_path / "eval"
    assert cli(capsys, "evaluate", "--pred", pred, "--ref", root, "--out", out)[0] == 0
    browser = Browser(binary, tmp_path / "profile")
    try:
        browser.open((out / "qa.html").as_uri())
        browser.wait_for("window.qa && window.qa.ready")
        rows = browser.evaluate("[...document.querySelectorAll('#case-table tbody tr')]"
                                ".map(r => r.cells[0].textContent)")
        assert sorted(rows) == list(CASES) and rows[-1] == "case_000"  # worst first
        assert browser.evaluate("window.qa.loaded") == rows[0]
        index = next(c["view_index"] for c in page_data(out / "qa.html")["cases"] if c["case"] == rows[0])
        stored = list(read_views(out / "qa.npz"))[index][1]
        decoded = np.array(browser.evaluate("Array.from(window.qa.state.vol.image)"), dtype=int)
        assert decoded.size == stored["image"].size  # the browser decoded the scan's WebP picture ...
        assert np.abs(decoded - stored["image"].ravel()).mean() < 2.0  # ... to the stored codes, near enough
        assert browser.evaluate("Array.from(window.qa.state.vol.pred)") == stored["pred"].ravel().tolist()
        shown = browser.evaluate(PIXELS)
        assert shown["lit"] > shown["total"] // 4, shown  # not blank
        assert browser.evaluate(choose("overlay", "none")) == "none"
        bare = browser.evaluate(PIXELS)
        assert bare["hash"] != shown["hash"]  # the prediction's overlay went away
        browser.evaluate(choose("overlay", "ref"))  # the reference has the liver the prediction lacks
        assert browser.evaluate(PIXELS)["hash"] not in (shown["hash"], bare["hash"])
        browser.evaluate("document.querySelector('#case-table tbody tr:last-child').click()")
        browser.wait_for("window.qa.loaded === 'case_000'")
        browser.evaluate("document.querySelector('input[value=coronal]').click()")
        coronal = browser.evaluate(PIXELS)
        assert coronal["lit"] > 0 and coronal["height"] != shown["height"]
        assert browser.console_errors == []
        ARTEFACTS.mkdir(parents=True, exist_ok=True)
        shot = browser.screenshot(ARTEFACTS / "qa_page.png")
        assert shot.stat().st_size > 10_000
        shutil.copy(out / "qa.html", ARTEFACTS / "qa_page.html")
    finally:
        browser.close()
