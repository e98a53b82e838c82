"""``benchmarks/gin_washout.py``: its washout definition on synthetic slices, its refusal of a
missing bundle, and (where the shared bundle is present) a short run on real CT and MRI slices."""

import json

import pytest
import torch

from fedgin.augment import GIN

from conftest import benchmark_module

@pytest.fixture(scope="module")
def washout():
    with benchmark_module("gin_washout") as module:
        yield module


def synthetic_slices() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32 x 32 slices: a textured disk (the body) on a flat negative background, each z-scored
    over the disk, and the disk as the body mask."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    body = ((yy - 16) ** 2 + (xx - 16) ** 2 < 12**2).expand(2, 32, 32)
    texture = torch.stack([torch.sin(xx / 3) + torch.cos(yy / 5), (xx - yy) / 10])
    z = torch.stack([(t - t[m].mean()) / t[m].std(correction=0) for t, m in zip(texture, body)])
    return torch.where(body, z, torch.tensor(-3.0)), body


def test_std_rms_ratio_is_the_washout_measure_over_the_body_only(washout):
    body = torch.zeros(1, 4, 4, dtype=torch.bool)
    body[0, :2] = True  # 8 body voxels
    image = torch.full((1, 1, 4, 4), 1e6)  # outside the body: must not count
    image[0, 0, :2] = torch.tensor([1.0, 3.0] * 4).view(2, 4)  # mean 2, sd 1, RMS sqrt(5)
    assert washout.std_rms_ratio(image, body).item() == pytest.approx(1 / 5**0.5)
    # std / RMS = 1 / sqrt(m^2 + 1) for sd 1 and mean m: just below and just above 0.2
    for mean, expected in ((5.0, True), (4.8, False)):
        image[0, 0, :2] = torch.tensor([mean - 1, mean + 1] * 4).view(2, 4)
        ratio = washout.std_rms_ratio(image, body)
        assert ratio.item() == pytest.approx(1 / (mean**2 + 1) ** 0.5)
        assert washout.washed_out(ratio).item() is expected


def test_a_constant_draw_is_washed_out_and_the_input_is_not(washout):
    slices, body = synthetic_slices()
    generator = torch.Generator().manual_seed(0)

    constant = washout.gin_ratios(lambda x, generator: torch.full_like(x, 3.0), slices, body, 5, generator)
    assert constant.shape == (2, 5)
    assert constant.tolist() == [[0.0] * 5] * 2
    assert washout.summarise(constant) == {"draws": 10, "washed_out": 10, "washed_out_share": 1.0,
                                           "median_ratio": 0.0}

    same = washout.gin_ratios(lambda x, generator: x.clone(), slices, body, 5, generator)
    assert same.flatten().tolist() == pytest.approx([1.0] * 10)  # body mean 0: std = RMS
    assert washout.summarise(same)["washed_out"] == 0


def test_gin_draws_are_scored_per_slice_and_reproducible_for_a_seed(washout):
    slices, body = synthetic_slices()
    gin = GIN(spatial_dims=2)
    first = washout.gin_ratios(gin, slices, body, 20, torch.Generator().manual_seed(3))
    again = washout.gin_ratios(gin, slices, body, 20, torch.Generator().manual_seed(3))
    assert first.shape == (2, 20)
    assert torch.equal(first, again)  # both intensity modes are scored with the same networks
    assert ((first >= 0) & (first <= 1 + 1e-6)).all()


def test_a_missing_bundle_exits_2_and_writes_nothing(washout, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        washout.main(["--bundle", str(tmp_path / "absent"), "--out", str(tmp_path / "out" / "washout.json")])
    assert exc.value.code == 2
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "real data bundle not found" in err


def test_zscored_input_washes_out_fewer_draws_on_real_ct_and_mri(washout, shared_data, tmp_path):
    out = tmp_path / "washout.json"
    washout.main(["--draws", "10", "--bundle", str(shared_data), "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"CT", "MRI"}
    for modality, modes in result["results"].items():
        assert modes["unit"]["draws"] == modes["zscore"]["draws"] == 30  # 3 slices x 10 draws
        assert modes["zscore"]["washed_out_share"] < modes["unit"]["washed_out_share"], modality
        assert modes["zscore"]["median_ratio"] > modes["unit"]["median_ratio"], modality
    assert f"`{result['command']}`" in out.with_suffix(".md").read_text()
