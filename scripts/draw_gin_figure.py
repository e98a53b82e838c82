"""Figure of GIN draws: a phantom CT and a phantom MRI axial slice, each followed by eight draws.

The slices are what the trainer sees: ``preprocess(..., PreprocessConfig())`` with its defaults
(RAS, 2.5 mm in-plane, 128 x 128, ``intensity="zscore"``: CT window [-125, 275] HU or MRI
0.5/99.5 percentiles, then body mean 0 and sd 1, air and padding one negative value), the slice
with the most organ voxels, and GIN runs on that plane. Every panel is shown in radiological view
(patient's right on the image left, anterior up) with its own 1/99 percentile window, since
z-scored values are not in [0, 1] and GIN changes the intensity range; the window ignores the outer
frame as wide as GIN's receptive-field radius, where the convolutions' zero padding makes edges
that would otherwise set it. Writes ``docs/gin_draws.png``.

Usage: ``python scripts/draw_gin_figure.py [--seed 0] [--out docs/gin_draws.png]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedgin.augment import GIN  # noqa: E402
from fedgin.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from fedgin.synthetic import make_phantom  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRAWS = 8
WINDOW_PERCENTILES = (1.0, 99.0)


def busiest_slice(label: np.ndarray) -> int:
    """The slice (axis 0 of ``D x H x W``) with the most organ voxels, the middle one on ties."""
    counts = (label > 0).sum(axis=(1, 2))
    best = np.flatnonzero(counts == counts.max())
    return int(best[len(best) // 2])


def radiological(plane: np.ndarray) -> np.ndarray:
    """A preprocessed ``H x W`` plane (RAS: R-L index, A-P index) as radiologists view an axial
    slice: anterior up, the patient's right on the left."""
    return plane.T[::-1, ::-1]


def display_window(plane: np.ndarray, frame: int) -> tuple[float, float]:
    """``WINDOW_PERCENTILES`` of ``plane`` without its outer ``frame`` pixels."""
    inner = plane[frame:-frame, frame:-frame] if frame else plane
    lo, hi = np.percentile(inner, WINDOW_PERCENTILES)
    return float(lo), float(max(hi, lo + 1e-6))


def show(ax, plane: np.ndarray, frame: int, title: str) -> None:
    lo, hi = display_window(plane, frame)
    ax.imshow(radiological(plane), cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="phantom seed and GIN generator seed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gin_draws.png")
    args = parser.parse_args(argv)

    config = PreprocessConfig()
    gin = GIN(spatial_dims=2)
    frame = gin.layers * (max(gin.kernel_sizes) // 2)
    generator = torch.Generator().manual_seed(args.seed)
    fig, axes = plt.subplots(2, DRAWS + 1, figsize=(2.0 * (DRAWS + 1), 4.9), squeeze=False)
    for row, modality in enumerate(("CT", "MRI")):
        case = make_phantom(args.seed, modality)
        pre = preprocess(case.image, case.affine, modality, config, case.label)
        index = busiest_slice(pre.label)
        plane = pre.image[index]
        batch = torch.from_numpy(plane)[None, None].expand(DRAWS, 1, -1, -1).contiguous()
        draw = gin.draw(DRAWS, 1, generator)
        augmented = gin.apply(batch, draw).numpy()[:, 0]

        show(axes[row, 0], plane, 0, f"{modality} z-scored, slice {index + 1}/{len(pre.image)}")
        for k in range(DRAWS):
            show(axes[row, k + 1], augmented[k], frame, f"GIN {k + 1}, alpha={float(draw.alpha[k]):.2f}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"GIN draws on z-scored phantom slices as the trainer sees them (seed {args.seed}; "
                 f"intensity={config.intensity!r}; {gin!r}); each panel: its own 1-99% window", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
