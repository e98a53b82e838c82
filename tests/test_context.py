"""2.5D context (``--context K``): the model sees each slice with its neighbours as channels, GIN
changes the contrast of a whole stack alike, training and prediction build the stacks the same way."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedgin.augment import GIN, IPA
from fedgin.cli import main
from fedgin.config import resolve
from fedgin.data.labels import get_scheme
from fedgin.engine.context import neighbours, stack_slices
from fedgin.engine.inference import iter_probs
from fedgin.engine.model import ModelConfig, build_model
from fedgin.engine.sampling import SliceIndex
from fedgin.data.sites import CaseData
from fedgin.errors import FedginError

SCHEME = get_scheme("abdomen5")


def test_neighbours_repeat_the_edge_slices():
    assert neighbours(0, 3, 3, 3).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    assert neighbours(4, 5, 6, 5).tolist() == [[2, 3, 4, 5, 5]]
    volume = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    stack = stack_slices(volume, 1, 3, 3)
    assert stack.shape == (2, 3, 2, 2)
    assert np.array_equal(stack[0], volume[[0, 1, 2]]) and np.array_equal(stack[1], volume[[1, 2, 3]])


@pytest.mark.parametrize("make", [lambda: GIN(spatial_dims=2, stack=True),
                                  lambda: IPA(spatial_dims=2, gin=GIN(spatial_dims=2, stack=True))])
def test_one_gin_draw_changes_every_slice_of_a_stack_alike(make):
    aug = make()
    torch.manual_seed(0)
    slice_ = torch.randn(4, 1, 32, 32)
    x = slice_.repeat(1, 3, 1, 1)  # three identical slices per sample
    y = aug(x, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 0], y[:, 2])
    assert not torch.allclose(y[0, 0], x[0, 0])  # augmented
    same = aug(slice_[:1].repeat(2, 3, 1, 1), generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(same[0], same[1])  # each sample its own draw
    # the norm of the whole stack is kept
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-4)


def test_a_stack_of_one_slice_is_plain_gin():
    x = torch.randn(3, 1, 16, 16)
    a = GIN(spatial_dims=2, stack=True)(x, generator=torch.Generator().manual_seed(4))
    b = GIN(spatial_dims=2)(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_training_reads_the_centre_slice_with_its_neighbours():
    image = np.random.default_rng(0).normal(size=(5, 20, 20)).astype(np.float32)
    label = np.zeros((5, 20, 20), np.uint8)
    label[:, 5:9, 5:9] = 1
    case = CaseData("c", "CT", image, label, np.ones(SCHEME.num_classes, bool), None, None)
    index = SliceIndex([case])
    idx = np.array([0, 2, 4])
    flat, labels, _ = index.read(idx, (16, 16), np.random.default_rng(3))
    stacked, labels3, _ = index.read(idx, (16, 16), np.random.default_rng(3), context=3)
    assert stacked.shape == (3, 3, 16, 16) and np.array_equal(labels, labels3)
    assert np.array_equal(stacked[:, 1], flat)  # the centre channel is the 2D slice, cut at the same place
    assert np.array_equal(stacked[0, 0], stacked[0, 1])  # the first slice repeats below itself


def test_inference_feeds_a_context_model_its_stacks():
    seen = []

    class Probe(torch.nn.Module):
        in_channels = 3

        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], SCHEME.num_classes, *x.shape[2:])

    image = np.arange(4 * 16 * 16, dtype=np.float32).reshape(4, 16, 16)
    list(iter_probs(Probe(), image, torch.device("cpu"), batch_size=3))
    assert [tuple(x.shape) for x in seen] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert torch.equal(seen[1][0], torch.from_numpy(image[[2, 3, 3]]))
    assert build_model(ModelConfig(in_channels=3, channels=(4, 8, 16, 32))).in_channels == 3


def test_context_must_be_odd():
    assert resolve("quick", command="t", out="o", sites=(), context=3).model.in_channels == 3
    with pytest.raises(FedginError, match="odd"):
        resolve("quick", command="t", out="o", sites=(), context=2)


def test_a_2_5d_model_trains_and_predicts_end_to_end(phantom_datasets, tmp_path, capsys):
    ct, _ = phantom_datasets(2, 1)
    run = tmp_path / "run"
    assert main(["train", "--site", f"ct={ct}", "--mode", "local", "--out", str(run), "--context", "3",
                 "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--threads", "1",
                 "--no-compile", "--cache-dir", str(tmp_path / "cache")]) == 0
    config = json.loads((run / "ct" / "config.json").read_text())
    assert config["model"]["in_channels"] == 3
    assert main(["predict", "-i", str(ct / "imagesTr"), "-o", str(tmp_path / "pred"), "--model", str(run / "ct"),
                 "--modality", "CT"]) == 0
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 2
