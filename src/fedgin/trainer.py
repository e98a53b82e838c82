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

from .config import TrainConfig
from .data.sites import CaseData
from .inference import predict_preprocessed_labels
from .labels import LabelScheme
from .losses import PartialLabelDiceCELoss
from .metrics import dice_score, mean_sd


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch and make CPU kernels deterministic (repeatable runs on CPU)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    torch.use_deterministic_algorithms(True, warn_only=True)


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


class SliceBank:
    """All training slices of some cases in one array, with foreground/background indices.

    ``images`` N x H x W float32, ``labels`` N x H x W uint8, ``annotated`` N x C bool.
    """

    def __init__(self, cases: list[CaseData]):
        if not cases:
            raise ValueError("no training cases")
        self.images = np.concatenate([c.image for c in cases]).astype(np.float32, copy=False)
        self.labels = np.concatenate([c.label for c in cases])
        self.annotated = np.concatenate(
            [np.repeat(c.annotated[None], c.image.shape[0], axis=0) for c in cases]
        )
        has_organ = (self.labels.reshape(len(self.labels), -1) > 0).any(axis=1)
        self.foreground = np.flatnonzero(has_organ)
        self.background = np.flatnonzero(~has_organ)

    def __len__(self) -> int:
        return len(self.images)


class BalancedSampler:
    """Batches that always mix organ slices and background slices.

    Each batch takes ``round(batch_size * foreground_fraction)`` slices showing an organ and the
    rest from slices without one (when a kind is missing, the other fills the batch).
    """

    def __init__(self, bank: SliceBank, batch_size: int, foreground_fraction: float, rng: np.random.Generator):
        self.bank, self.batch_size, self.rng = bank, batch_size, rng
        self.n_fg = round(batch_size * foreground_fraction)
        if len(bank.foreground) == 0:
            self.n_fg = 0
        if len(bank.background) == 0:
            self.n_fg = batch_size

    def batch(self) -> np.ndarray:
        fg = self.rng.choice(self.bank.foreground, self.n_fg) if self.n_fg else np.empty(0, int)
        n_bg = self.batch_size - self.n_fg
        bg = self.rng.choice(self.bank.background, n_bg) if n_bg else np.empty(0, int)
        return np.concatenate([fg, bg])


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
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels.float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False).to(labels.dtype)
    return images, labels


class Trainer:
    """Trains a segmentation model on preprocessed cases.

    ``fit`` runs whole epochs; the model and optimiser persist across calls (local and centralized
    modes call it once per epoch so each epoch is checkpointed; the federated client makes a fresh
    Trainer per round, as FedAvg clients start each round from the global weights).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, scheme: LabelScheme,
                 device: torch.device, seed: int = 0, *, gin: bool | None = None):
        self.model = model.to(device)
        self.cfg, self.scheme, self.device, self.seed = cfg, scheme, device, seed
        self.use_gin = cfg.gin if gin is None else gin
        self.loss_fn = PartialLabelDiceCELoss()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.gin = self.ipa = None
        if self.use_gin:
            from .augment import GIN, IPA

            self.gin = GIN(spatial_dims=2, p=cfg.gin_p)
            self.ipa = IPA(spatial_dims=2, p=cfg.gin_p) if cfg.ipa else None
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

    def _augment(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        if self.cfg.spatial_augment:
            images, labels = random_affine(images, labels, gen)
        if self.ipa is not None:
            images = self.ipa(images, generator=gen)
        elif self.gin is not None:
            images = self.gin(images, generator=gen)
        return images, labels

    def fit(self, cases: list[CaseData], epochs: int = 1, *, start_epoch: int = 0,
            val_cases: list[CaseData] | None = None, global_params: list[torch.Tensor] | None = None,
            desc: str = "train", on_epoch=None) -> list[EpochResult]:
        """Train ``epochs`` epochs on ``cases``; returns one :class:`EpochResult` per epoch.

        ``global_params`` (FedProx) adds ``proximal_mu / 2 * ||w - w_global||^2`` to the loss.
        ``on_epoch(result)`` is called after each epoch (metrics lines, checkpoints).
        """
        bank = SliceBank(cases)
        steps = self.cfg.steps_per_epoch or max(1, math.ceil(len(bank) / self.cfg.batch_size))
        results = []
        for epoch in range(start_epoch, start_epoch + epochs):
            rng = np.random.default_rng([self.seed, epoch])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            sampler = BalancedSampler(bank, self.cfg.batch_size, self.cfg.foreground_fraction, rng)
            start = time.perf_counter()
            total = 0.0
            self.model.train()
            bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}", leave=False, unit="step", disable=None)
            for _ in bar:
                idx = sampler.batch()
                loss = self.step(bank, idx, gen, global_params)
                total += loss
                bar.set_postfix(loss=f"{loss:.3f}")
            dice = self.validate(val_cases) if (val_cases and self.cfg.validate) else {}
            result = EpochResult(epoch=epoch + 1, loss=total / steps, dice=dice,
                                 seconds=time.perf_counter() - start,
                                 num_slices=steps * self.cfg.batch_size, steps=steps)
            results.append(result)
            if on_epoch is not None:
                on_epoch(result)
        return results

    def step(self, bank: SliceBank, idx: np.ndarray, gen: torch.Generator,
             global_params: list[torch.Tensor] | None = None) -> float:
        """One optimisation step on slices ``idx`` of ``bank``; returns the loss."""
        images = torch.from_numpy(bank.images[idx])[:, None].to(self.device, non_blocking=True)
        labels = torch.from_numpy(bank.labels[idx].astype(np.int64))[:, None].to(self.device)
        annotated = torch.from_numpy(bank.annotated[idx]).to(self.device)
        images, labels = self._augment(images, labels, gen)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = self.model(images)
        loss = self.loss_fn(logits.float(), labels, annotated)
        if global_params is not None and self.cfg.proximal_mu > 0:
            prox = sum(((p - g) ** 2).sum() for p, g in zip(self.model.parameters(), global_params))
            loss = loss + 0.5 * self.cfg.proximal_mu * prox
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def validate(self, cases: list[CaseData]) -> dict[str, float | None]:
        """Mean per-case 3D Dice per organ on preprocessed validation cases (None if never annotated)."""
        per_organ: dict[str, list[float | None]] = {o: [] for o in self.scheme.organs}
        for case in cases:
            pred = predict_preprocessed_labels(self.model, case.image, self.device)
            for organ, idx in self.scheme.label_ids.items():
                if idx == 0 or not case.annotated[idx]:
                    continue
                per_organ[organ].append(dice_score(pred == idx, case.label == idx))
        return {o: mean_sd(v)["mean"] for o, v in per_organ.items()}
