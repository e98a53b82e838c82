"""The one local trainer, called by every mode: local, centralized and the federated client.

A federated round is "load the global weights, call :meth:`Trainer.fit` for ``local_epochs`` on
this site, return weights and metrics" and nothing more.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..augment import GIN, IPA, RandomCurve, RandomField, RandomIntensity
from ..config import TrainConfig
from ..data.labels import LabelScheme
from ..data.preprocess import PreprocessConfig
from ..data.sites import CaseData
from .compiled import compiled_or_eager
from .inference import case_prediction
from .losses import PartialLabelDiceCELoss, view_consistency
from .metrics import dice_score, mean_sd
from .sampling import BalancedSampler, SliceIndex, training_crop


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch and make CPU kernels deterministic (repeatable runs on CPU)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    set_deterministic()


def set_deterministic() -> None:
    """Deterministic kernels, warn-only (``torch.use_deterministic_algorithms(True, warn_only=True)``).

    ``torch.use_deterministic_algorithms`` also sets inductor's ``deterministic`` flag and imports
    inductor for it: 3 s at the start of every process (each Flower ClientApp is one), although
    only a compiled step reads it. So the flag is set here only when inductor is already loaded,
    and :mod:`fedgin.engine.compiled` sets it from torch's state before it compiles."""
    import sys

    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)


@dataclass
class EpochResult:
    """What one epoch of local training reports (scalars only: this is what may leave a site)."""

    epoch: int
    loss: float
    dice: dict[str, float | None]
    seconds: float
    num_slices: int
    steps: int
    extra: dict = field(default_factory=dict)

    @property
    def mean_dice(self) -> float | None:
        vals = [v for v in self.dice.values() if v is not None]
        return float(np.mean(vals)) if vals else None


def random_affine(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  max_rotation_deg: float = 10.0, scale: tuple[float, float] = (0.9, 1.1)):
    """A random in-plane rotation and scale per sample; images bilinear, labels nearest.

    No flips: left and right organs (liver, spleen, the two kidneys) must keep their sides.
    """
    b = images.shape[0]
    rnd = torch.rand(b, 2, generator=generator).to(images.device)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(max_rotation_deg)
    s = scale[0] + rnd[:, 1] * (scale[1] - scale[0])
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # the border is air: with z-scored slices, zero padding would paint body-mean tissue in
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False).to(labels.dtype)
    return images, labels


def forward_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 annotated: torch.Tensor, views: int, consistency: float, amp: bool) -> torch.Tensor:
    """The step's forward pass and loss (what :mod:`fedgin.engine.compiled` compiles): logits of
    ``images`` (float16 autocast when ``amp``), the partial-label loss, plus ``consistency`` times the
    views' KL when there are ``views >= 2`` views."""
    with torch.autocast(device_type=images.device.type, dtype=torch.float16, enabled=amp):
        logits = model(images)
    loss = loss_fn(logits.float(), labels, annotated)
    if views > 1 and consistency > 0:
        loss = loss + consistency * view_consistency(logits, views)
    return loss


def poly_lr(base_lr: float, step: int, total_steps: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule: ``base_lr * (1 - step / total_steps) ** exponent`` for the 0-based
    ``step`` of a run of ``total_steps``; the last step runs at ``base_lr * (1 / total) ** exponent``."""
    return base_lr * (1.0 - min(step, total_steps) / max(total_steps, 1)) ** exponent


class Trainer:
    """Trains a segmentation model on preprocessed cases.

    ``fit`` runs whole epochs; the model and optimiser persist across calls. Local and centralized
    modes keep one Trainer for the run; the federated client makes one per round and carries the
    optimiser's state across rounds itself (:meth:`optimizer_state`, :meth:`load_optimizer_state`).

    The learning rate follows one schedule over the whole run of ``total_epochs`` epochs
    (``cfg.lr_schedule``: ``poly`` or ``constant``), indexed by the absolute epoch passed to
    :meth:`fit` (a federated round ``r`` starts at epoch ``(r - 1) * local_epochs``).

    Each step takes ``cfg.batch_size`` images: without GIN, that many slices; with GIN,
    ``round(batch_size / k)`` slices in ``k = gin_views + clean_view`` views each (same geometry,
    independent intensity draws), so every method costs the same per step. With ``k >= 2`` the
    loss adds ``consistency`` times the KL of each view's prediction from the views' mean
    (:func:`fedgin.engine.losses.view_consistency`).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, scheme: LabelScheme,
                 device: torch.device, seed: int = 0, *, gin: bool | None = None,
                 total_epochs: int | None = None, spacing_mm: tuple[float, float] | None = None):
        self.model = model.to(device)
        self.cfg, self.scheme, self.device, self.seed = cfg, scheme, device, seed
        self.use_gin = cfg.gin if gin is None else gin
        self.total_epochs = cfg.epochs if total_epochs is None else total_epochs
        self.loss_fn = PartialLabelDiceCELoss()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.intensity = RandomIntensity() if cfg.intensity_augment else None
        # off by default: a run without curves draws exactly what it drew before they existed
        self.curve = RandomCurve(p=cfg.curve_p) if cfg.curve_p > 0 else None
        # likewise off by default; its window's smallest side in voxels of the preprocessed plane
        spacing = spacing_mm or PreprocessConfig().spacing_mm
        self.field = (RandomField(cfg.fov_p, tuple(math.ceil(cfg.fov_min_mm / s) for s in spacing))
                      if cfg.fov_p > 0 else None)
        self.gin = self.ipa = None
        # 2.5D (in_channels K > 1): each slice comes with its neighbours, and one GIN draw per
        # sample changes the contrast of the whole stack alike
        self.context = int(getattr(model, "in_channels", 1) or 1)
        stack = self.context > 1
        if self.use_gin:
            self.gin = GIN(spatial_dims=2, p=cfg.gin_p, stack=stack)
            self.ipa = IPA(spatial_dims=2, p=cfg.gin_p, gin=GIN(spatial_dims=2, stack=stack)) if cfg.ipa else None
        self.views = (max(1, cfg.gin_views) + int(cfg.clean_view)) if self.use_gin else 1
        self.slices_per_step = max(1, round(cfg.batch_size / self.views))
        self.last_lr = cfg.lr
        self.forward_loss = compiled_or_eager(forward_loss, cfg.compile, device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

    # --- optimiser state (kept across federated rounds at the site) --------------------------
    def optimizer_state(self) -> dict:
        """The optimiser's (and AMP scaler's) state: tensors and numbers only."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def lr_at(self, step: int, total_steps: int) -> float:
        if self.cfg.lr_schedule == "constant":
            return self.cfg.lr
        return poly_lr(self.cfg.lr, step, total_steps, self.cfg.poly_exponent)

    def _views(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``B x 1 x H x W`` -> ``(k * B) x 1 x H x W``, view-major: the GIN (or IPA) views, then the
        clean view; each with its own standard intensity (and intensity curve) draw."""
        out = []
        for v in range(self.views):
            x = self.intensity(images, generator=gen) if self.intensity is not None else images
            x = self.curve(x, generator=gen) if self.curve is not None else x
            is_clean = self.cfg.clean_view and v == self.views - 1
            if self.use_gin and not is_clean:
                x = self.ipa(x, generator=gen) if self.ipa is not None else self.gin(x, generator=gen)
            out.append(x)
        return torch.cat(out) if len(out) > 1 else out[0]

    def fit(self, cases: list[CaseData], epochs: int = 1, *, start_epoch: int = 0,
            val_cases: list | None = None, global_params: list[torch.Tensor] | None = None,
            desc: str = "train", on_epoch=None, validate_each_epoch: bool = True) -> list[EpochResult]:
        """Train ``epochs`` epochs on ``cases`` from the absolute epoch ``start_epoch``; returns one
        :class:`EpochResult` per epoch.

        ``val_cases`` are scored after every epoch, or only after the last one with
        ``validate_each_epoch=False`` (a federated round reports only its last epoch's scores).

        ``global_params`` (FedProx) adds ``proximal_mu / 2 * ||w - w_global||^2`` to the loss.
        ``on_epoch(result)`` is called after each epoch (metrics lines, checkpoints).
        """
        bank = SliceIndex(cases)
        crop = training_crop(cases)
        steps = self.cfg.steps_per_epoch or max(1, math.ceil(len(bank) / self.slices_per_step))
        total_steps = max(self.total_epochs, start_epoch + epochs) * steps
        results = []
        for epoch in range(start_epoch, start_epoch + epochs):
            rng = np.random.default_rng([self.seed, epoch])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            sampler = BalancedSampler(bank, self.slices_per_step, self.cfg.foreground_fraction, rng)
            start = time.perf_counter()
            total = 0.0
            self.model.train()
            bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}", leave=False, unit="step", disable=None)
            for i in bar:
                self.last_lr = self.lr_at(epoch * steps + i, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.last_lr
                images, labels, annotated = bank.read(sampler.batch(), crop, rng, self.context, self.field)
                loss = self.step(images, labels, annotated, gen, global_params)
                total += loss
                bar.set_postfix(loss=f"{loss:.3f}")
            last = epoch == start_epoch + epochs - 1
            wanted = val_cases and self.cfg.validate and (validate_each_epoch or last)
            dice = self.validate(val_cases) if wanted else {}
            result = EpochResult(epoch=epoch + 1, loss=total / steps, dice=dice,
                                 seconds=time.perf_counter() - start,
                                 num_slices=steps * self.slices_per_step, steps=steps,
                                 extra={"lr": self.last_lr})
            results.append(result)
            if on_epoch is not None:
                on_epoch(result)
        return results

    def step(self, images: np.ndarray, labels: np.ndarray, annotated: np.ndarray, gen: torch.Generator,
             global_params: list[torch.Tensor] | None = None) -> float:
        """One optimisation step on ``B x H x W`` images and labels (``B x C`` annotation flags, as
        :meth:`SliceIndex.read` gives them); returns the loss."""
        images = torch.from_numpy(images)
        images = (images if images.ndim == 4 else images[:, None]).to(self.device, non_blocking=True)
        labels = torch.from_numpy(labels.astype(np.int64))[:, None].to(self.device)
        annotated = torch.from_numpy(annotated).to(self.device)
        if self.cfg.spatial_augment:
            images, labels = random_affine(images, labels, gen)
        images = self._views(images, gen)
        if self.views > 1:
            labels, annotated = labels.repeat(self.views, 1, 1, 1), annotated.repeat(self.views, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(self.model, self.loss_fn, images, labels, annotated, self.views,
                                 self.cfg.consistency, self.amp)
        if global_params is not None and self.cfg.proximal_mu > 0:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(self.model.parameters(), global_params))
            loss = loss + 0.5 * self.cfg.proximal_mu * prox
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def validate(self, cases: list) -> dict[str, float | None]:
        """Mean per-case 3D Dice per organ on validation cases (None if never annotated), each
        scored where :func:`fedgin.engine.inference.case_prediction` puts it: a site's validation
        cases on their input grid, as ``fedgin predict`` would write them (no post-processing)."""
        per_organ: dict[str, list[float | None]] = {o: [] for o in self.scheme.organs}
        for case in cases:
            pred, label = case_prediction(self.model, case, self.device)
            for organ, idx in self.scheme.label_ids.items():
                if idx == 0 or not case.annotated[idx]:
                    continue
                per_organ[organ].append(dice_score(pred == idx, label == idx))
        return {o: mean_sd(v)["mean"] for o, v in per_organ.items()}
