"""GIN and IPA: what the trainer relies on (shape, norm, randomness, reproducibility, no graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedgin.augment import GIN, IPA


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _image(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=_seeded(seed)).to(dtype)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.double().flatten(1).norm(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gin_keeps_shape_dtype_device(dtype: torch.dtype, spatial_dims: int) -> None:
    shape = (3, 2, 16, 12) if spatial_dims == 2 else (3, 2, 10, 8, 6)
    x = _image(*shape, dtype=dtype)
    y = GIN(spatial_dims=spatial_dims)(x)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gin_keeps_each_samples_frobenius_norm(dtype: torch.dtype, spatial_dims: int) -> None:
    shape = (5, 2, 32, 32) if spatial_dims == 2 else (5, 2, 12, 12, 8)
    x = _image(*shape, dtype=dtype) * torch.arange(1, 6, dtype=dtype).view(-1, 1, 1, 1, 1)[
        (slice(None),) + (0,) * (3 - spatial_dims)
    ]
    y = GIN(spatial_dims=spatial_dims)(x, generator=_seeded())
    assert torch.allclose(_norms(y), _norms(x), rtol=1e-4, atol=0)


def test_gin_keeps_zero_image_zero() -> None:
    y = GIN()(torch.zeros(2, 1, 8, 8))
    assert torch.equal(y, torch.zeros(2, 1, 8, 8))


def test_gin_draws_a_different_network_per_sample_and_per_call() -> None:
    x = _image(1, 1, 24, 24).expand(6, -1, -1, -1).contiguous()
    gin = GIN()
    first, second = gin(x), gin(x)
    for b in range(1, 6):
        assert not torch.allclose(first[b], first[0])
    assert not torch.allclose(first, second)


def test_gin_with_a_seeded_generator_repeats_exactly() -> None:
    x = _image(4, 1, 32, 32)
    gin = GIN()
    assert torch.equal(gin(x, generator=_seeded(7)), gin(x, generator=_seeded(7)))
    assert not torch.equal(gin(x, generator=_seeded(7)), gin(x, generator=_seeded(8)))


def test_gin_p_zero_and_alpha_zero_are_the_identity() -> None:
    x = _image(4, 1, 16, 16)
    assert torch.equal(GIN(p=0.0)(x), x)
    assert torch.equal(GIN(alpha_range=(0.0, 0.0))(x), x)


def test_gin_p_selects_samples_and_leaves_the_others_unchanged() -> None:
    x = _image(1, 1, 8, 8).expand(200, -1, -1, -1).contiguous()
    y = GIN(p=0.5)(x, generator=_seeded(3))
    unchanged = (y == x).flatten(1).all(dim=1)
    assert 60 < int(unchanged.sum()) < 140


def test_gin_builds_no_graph_and_leaves_input_untouched() -> None:
    x = _image(2, 1, 16, 16).requires_grad_(True)
    before = x.detach().clone()
    y = GIN()(x)
    assert not y.requires_grad and y.grad_fn is None
    assert torch.equal(x.detach(), before)
    ipa_out = IPA()(x)
    assert not ipa_out.requires_grad and torch.equal(x.detach(), before)


def test_gin_draws_every_kernel_size() -> None:
    draw = GIN(kernel_sizes=(1, 3, 5)).draw(64, 1, _seeded())
    assert set(draw.kernel_sizes.unique().tolist()) == {1, 3, 5}
    low, high = 0.2, 0.6
    alpha = GIN(alpha_range=(low, high)).draw(256, 1, _seeded()).alpha
    assert low <= float(alpha.min()) and float(alpha.max()) <= high


def _reference(gin: GIN, x: torch.Tensor, draw) -> torch.Tensor:
    """Per-sample loop with each sample's own k x k kernels, as written in the paper."""
    conv = F.conv2d if gin.spatial_dims == 2 else F.conv3d
    outputs = []
    for b in range(x.shape[0]):
        h = x[b : b + 1]
        for layer, (w, bias) in enumerate(zip(draw.weights, draw.biases)):
            k, size = int(draw.kernel_sizes[layer, b]), w.shape[-1]
            lo = size // 2 - k // 2
            centre = (slice(None), slice(None)) + (slice(lo, lo + k),) * gin.spatial_dims
            h = conv(h, w[b][centre].to(x.dtype), bias[b].to(x.dtype), padding=k // 2)
            if layer < gin.layers - 1:
                h = F.leaky_relu(h, gin.negative_slope)
        alpha = float(draw.alpha[b])
        mixed = alpha * h[0] + (1 - alpha) * x[b]
        mixed = mixed * x[b].norm() / mixed.norm()
        outputs.append(mixed if bool(draw.selected[b]) else x[b])
    return torch.stack(outputs)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_batched_grouped_convolution_equals_a_per_sample_loop(spatial_dims: int) -> None:
    gin = GIN(spatial_dims=spatial_dims, kernel_sizes=(1, 3, 5), p=0.5)
    shape = (6, 2, 20, 16) if spatial_dims == 2 else (6, 2, 10, 9, 8)
    x = _image(*shape, dtype=torch.float64)
    draw = gin.draw(x.shape[0], x.shape[1], _seeded(5))
    # the draw mixes kernel sizes within a layer, the case the zero-embedding must get right
    assert any(len(row.unique()) > 1 for row in draw.kernel_sizes)
    assert not draw.selected.all() and draw.selected.any()
    assert torch.allclose(gin.apply(x, draw), _reference(gin, x, draw), rtol=1e-10, atol=1e-10)
    assert torch.equal(gin(x, generator=_seeded(5)), gin.apply(x, draw))


def test_gin_rejects_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError):
        GIN(kernel_sizes=(2,))
    with pytest.raises(ValueError):
        GIN(alpha_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="spatial_dims=2"):
        GIN()(torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(TypeError):
        GIN()(torch.zeros(1, 1, 4, 4, dtype=torch.int64))


def test_gin_repr_names_its_settings() -> None:
    text = repr(GIN(layers=3, kernel_sizes=(1, 3, 5)))
    assert text.startswith("GIN(") and "layers=3" in text and "kernel_sizes=(1, 3, 5)" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gin_with_a_cpu_generator_gives_the_same_draw_on_cuda() -> None:
    x = _image(3, 1, 32, 32)
    on_cpu = GIN()(x, generator=_seeded(11))
    on_cuda = GIN()(x.cuda(), generator=_seeded(11))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ipa_keeps_shape_norm_and_repeats_with_a_generator(spatial_dims: int) -> None:
    shape = (4, 1, 32, 24) if spatial_dims == 2 else (4, 1, 12, 10, 8)
    x = _image(*shape)
    ipa = IPA(spatial_dims=spatial_dims)
    y = ipa(x, generator=_seeded(2))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.allclose(_norms(y), _norms(x), rtol=1e-4, atol=0)
    assert torch.equal(y, ipa(x, generator=_seeded(2)))
    assert not torch.allclose(y, ipa(x, generator=_seeded(3)))
    assert IPA(spatial_dims=spatial_dims)(x.half()).dtype == torch.float16


def test_ipa_mask_is_smooth_and_in_unit_range() -> None:
    mask = IPA(grid_size=4).mask(3, (64, 64), _seeded())
    assert mask.shape == (3, 1, 64, 64)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    # neighbouring pixels differ by a small step: ~1/21 of the range between control points
    assert float(mask.diff(dim=-1).abs().max()) < 0.1


def test_ipa_blends_two_draws_and_p_zero_is_the_identity() -> None:
    x = _image(3, 1, 16, 16)
    # with identity GIN draws both blended images are x, so the blend is x again
    same = IPA(gin=GIN(alpha_range=(0.0, 0.0)))(x)
    assert torch.allclose(same, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(IPA(p=0.0)(x), x)
    with pytest.raises(ValueError):
        IPA(spatial_dims=3, gin=GIN(spatial_dims=2))
