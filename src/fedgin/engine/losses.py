"""Partial-label (marginal) Dice + cross-entropy loss.

A case that does not annotate an organ stores its voxels as 0, so "0" there means "background or
that organ". The marginal loss (Shi et al. 2021, "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation") merges the predicted probability of every non-annotated organ
into background before the loss, so predicting a non-annotated organ costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


def marginal_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with non-annotated classes folded into background.

    ``logits``: B x C x H x W[ x D]; ``annotated``: B x C bool (column 0, background, True).
    Returns B x C x ...: channel 0 is log(p_bg + sum of non-annotated p), annotated channels keep
    log p, non-annotated channels are -inf (probability 0).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    shape = annotated.shape + (1,) * (logits.ndim - 2)
    keep = annotated.view(shape)
    neg_inf = torch.finfo(logp.dtype).min
    into_bg = (~keep).clone()
    into_bg[:, 0] = True
    background = torch.logsumexp(logp.masked_fill(~into_bg, neg_inf), dim=1, keepdim=True)
    merged = logp.masked_fill(~keep, neg_inf)
    return torch.cat([background, merged[:, 1:]], dim=1)


class PartialLabelDiceCELoss(torch.nn.Module):
    """Marginal Dice + cross-entropy over the annotated classes of each sample.

    ``forward(logits, target, annotated)``: logits B x C x H x W[ x D], target B x 1 x ... or
    B x ... integer class ids, annotated B x C bool. Dice is MONAI's soft Dice over the batch
    (``batch=True``), foreground classes only; a non-annotated class has zero probability and zero
    target in that sample, so it adds nothing to that class's sums. Returns a scalar.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0):
        super().__init__()
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.dice = DiceLoss(include_background=False, softmax=False, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        annotated = annotated.bool()
        # a voxel labelled with a class the case says it does not annotate counts as unknown (0)
        known = annotated.gather(1, target.flatten(1)).view_as(target)
        target = target.masked_fill(~known, 0)
        log_q = marginal_log_probs(logits, annotated)
        ce = F.nll_loss(log_q, target)
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(log_q.dtype)
        dice = self.dice(log_q.exp(), onehot)
        return self.lambda_dice * dice + self.lambda_ce * ce


def view_consistency(logits: torch.Tensor, views: int) -> torch.Tensor:
    """Ouyang et al.'s consistency term: the KL divergence of each view's prediction from the
    mean prediction over the views of the same slice.

    ``logits``: ``(views * B) x C x H x W[ x D]``, view-major (rows ``v * B .. v * B + B - 1``
    are view ``v``). Returns ``mean over views, samples and voxels of sum_c p_mean log(p_mean /
    p_v)`` (the per-voxel KL, so its weight does not depend on the number of classes; Ouyang's
    lambda 10 with PyTorch's mean over B x C x H x W is about 10 / C on this scale). Zero when all
    views predict the same.
    """
    if views < 2:
        return logits.new_zeros(())
    logp = F.log_softmax(logits.float(), dim=1)
    logp = logp.view(views, -1, *logp.shape[1:])
    mean = logp.exp().mean(0, keepdim=True)
    log_mean = mean.clamp_min(1e-12).log()
    kl = (mean * (log_mean - logp)).sum(dim=2)
    return kl.mean()
