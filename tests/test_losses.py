"""The partial-label (marginal) loss on hand-made cases."""

import math

import torch

from fedgin.engine.losses import PartialLabelDiceCELoss, marginal_log_probs


def _logits_for(probs: list[float], h: int = 2, w: int = 2) -> torch.Tensor:
    """Logits whose softmax is ``probs`` at every pixel: 1 x C x h x w."""
    logp = torch.log(torch.tensor(probs))
    return logp.view(1, -1, 1, 1).expand(1, len(probs), h, w).clone()


def test_marginal_merges_unannotated_into_background():
    logits = _logits_for([0.2, 0.1, 0.3, 0.4])  # bg, liver, kidneys, spleen
    annotated = torch.tensor([[True, True, False, True]])
    q = marginal_log_probs(logits, annotated).exp()[0, :, 0, 0]
    assert torch.allclose(q, torch.tensor([0.5, 0.1, 0.0, 0.4]), atol=1e-6)


def test_predicting_an_unannotated_organ_costs_nothing():
    # target is all "0"; in a case without kidneys annotated, 0 means background-or-kidneys
    target = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    annotated = torch.tensor([[True, True, False, True]])
    loss_fn = PartialLabelDiceCELoss(lambda_dice=0.0)
    says_kidneys = loss_fn(_logits_for([0.01, 0.01, 0.97, 0.01]), target, annotated)
    says_background = loss_fn(_logits_for([0.98, 0.01, 0.00001, 0.01]), target, annotated)
    # CE = -log(p_bg + p_kidneys) in both cases: 0.98
    assert math.isclose(float(says_kidneys), -math.log(0.98), rel_tol=1e-4)
    assert math.isclose(float(says_background), -math.log(0.98001), rel_tol=1e-3)
    # with kidneys annotated, the same prediction is heavily punished
    full = torch.ones(1, 4, dtype=torch.bool)
    assert float(loss_fn(_logits_for([0.01, 0.01, 0.97, 0.01]), target, full)) > 4.0


def test_annotated_organ_still_supervised():
    target = torch.ones(1, 1, 2, 2, dtype=torch.long)  # liver everywhere
    annotated = torch.tensor([[True, True, False, False]])
    loss_fn = PartialLabelDiceCELoss()
    good = loss_fn(_logits_for([0.02, 0.96, 0.01, 0.01]), target, annotated)
    bad = loss_fn(_logits_for([0.96, 0.02, 0.01, 0.01]), target, annotated)
    assert float(good) < 0.1 < 1.0 < float(bad)


def test_gradient_does_not_push_away_unannotated_class():
    logits = _logits_for([0.25, 0.25, 0.25, 0.25]).requires_grad_(True)
    target = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    annotated = torch.tensor([[True, True, False, True]])
    PartialLabelDiceCELoss()(logits, target, annotated).backward()
    g = logits.grad[0, :, 0, 0]
    # background and the unannotated class are pulled up together, by the same amount
    assert torch.allclose(g[0], g[2], atol=1e-6)
    assert g[1] > 0 and g[3] > 0  # annotated wrong classes pushed down


def test_voxels_of_unannotated_class_in_label_are_ignored_as_unknown():
    target = torch.full((1, 1, 2, 2), 2, dtype=torch.long)  # says kidneys, but kidneys not annotated
    annotated = torch.tensor([[True, True, False, True]])
    loss = PartialLabelDiceCELoss(lambda_dice=0.0)(_logits_for([0.5, 0.1, 0.3, 0.1]), target, annotated)
    assert math.isclose(float(loss), -math.log(0.8), rel_tol=1e-4)
