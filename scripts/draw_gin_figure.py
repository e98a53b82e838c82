"""Figure of GIN draws: a phantom CT and a phantom MRI axial slice, each followed by eight draws.

The slices are normalised to [0, 1] as the trainer sees them (CT window [-125, 275] HU, MRI
0.5/99.5 percentiles), shown in radiological view (patient's right on the image left, anterior
up). Each GIN draw is displayed with its own 0.5/99.5 percentile window, since GIN changes the
intensity range; the window ignores the outer frame as wide as GIN's receptive-field radius, where
the convolutions' zero padding makes edges that would otherwise set the window. Writes
``docs/gin_draws.png``.

Usage: ``python scripts/draw_gin_figure.py [--seed 0] [--out docs/gin_draws.png]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedgin.augment import GIN  # noqa: E402
from fedgin.data.phantoms import make_phantom  # noqa: E402
from fedgin.data.preprocess import PreprocessConfig, normalise_intensity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRAWS = 8


def axial_slice(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, int]:
    """The axial slice with the most organ voxels (the middle one on ties) as an ``H x W`` array
    in radiological view, and its index along the volume's superior axis."""
    # reorient to LPS: axis 0 toward the patient's left, 1 posterior, 2 superior
    to_lps = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("LPS")
    )
    image = nib.orientations.apply_orientation(image, to_lps)
    label = nib.orientations.apply_orientation(label, to_lps)
    counts = (label > 0).sum(axis=(0, 1))
    best = np.flatnonzero(counts == counts.max())
    index = int(best[len(best) // 2])
    # rows follow posterior (anterior on top), columns follow left (patient's right on the left)
    return np.ascontiguousarray(image[:, :, index].T), index


def display_window(plane: np.ndarray, frame: int) -> tuple[float, float]:
    """0.5/99.5 percentiles of ``plane`` without its outer ``frame`` pixels."""
    inner = plane[frame:-frame, frame:-frame] if frame else plane
    lo, hi = np.percentile(inner, (0.5, 99.5))
    return float(lo), float(max(hi, lo + 1e-6))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="phantom seed and GIN generator seed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gin_draws.png")
    args = parser.parse_args(argv)

    gin = GIN(spatial_dims=2)
    frame = gin.layers * (max(gin.kernel_sizes) // 2)
    generator = torch.Generator().manual_seed(args.seed)
    fig, axes = plt.subplots(2, DRAWS + 1, figsize=(2.0 * (DRAWS + 1), 4.6), squeeze=False)
    for row, modality in enumerate(("CT", "MRI")):
        case = make_phantom(args.seed, modality)
        image = normalise_intensity(case.image, modality, PreprocessConfig())
        plane, index = axial_slice(image, case.label, case.affine)
        batch = torch.from_numpy(plane)[None, None].expand(DRAWS, 1, -1, -1).contiguous()
        draw = gin.draw(DRAWS, 1, generator)
        augmented = gin.apply(batch, draw).numpy()[:, 0]

        axes[row, 0].imshow(plane, cmap="gray", vmin=0.0, vmax=1.0)
        axes[row, 0].set_title(f"{modality} input (z={index})", fontsize=9)
        for k in range(DRAWS):
            lo, hi = display_window(augmented[k], frame)
            axes[row, k + 1].imshow(augmented[k], cmap="gray", vmin=lo, vmax=hi)
            axes[row, k + 1].set_title(f"GIN {k + 1}, alpha={float(draw.alpha[k]):.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"GIN draws on phantom slices (seed {args.seed}; {gin!r})", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
