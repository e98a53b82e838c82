"""Which training slices a step sees, and where its crop lies in them.

:class:`SliceIndex` knows where every training slice of some cases is and whether it shows an
organ; it holds no pixels (a case's arrays may stay on disk, :class:`fedgin.data.npy.NpyVolume`).
:class:`BalancedSampler` draws a batch of slice indices mixing organ and background slices, and
:meth:`SliceIndex.read` reads those slices and cuts one ``crop`` (the preset's ``slice_size``) from
each. A case's plane covers its whole body (see :mod:`fedgin.data.preprocess`), usually more than
one crop, so every labelled voxel can be reached:

- an organ slice is cut around one of its labelled voxels: an organ present in the slice is chosen
  uniformly (small organs are drawn as often as the liver, as nnU-Net's foreground oversampling
  does), then one of its voxels, then a crop position that contains it, uniformly;
- a background slice is cut at a uniform position inside the plane.
"""

from __future__ import annotations

import numpy as np

from ..augment.field import RandomField
from ..data.sites import CaseData
from .context import stack_slices
from .inference import tile_of


class SliceIndex:
    """The slices of ``cases`` as one numbered list: ``case_of[i]``, ``z_of[i]``, and the numbers of
    the slices with an organ (``foreground``) and without (``background``)."""

    def __init__(self, cases: list[CaseData]):
        if not cases:
            raise ValueError("no training cases")
        self.cases = cases
        depths = [len(c.image) for c in cases]
        self.case_of = np.repeat(np.arange(len(cases)), depths)
        self.z_of = np.concatenate([np.arange(d) for d in depths])
        has_organ = np.concatenate([c.slices_with_organs() for c in cases])
        self.foreground = np.flatnonzero(has_organ)
        self.background = np.flatnonzero(~has_organ)

    def __len__(self) -> int:
        return len(self.case_of)

    def read(self, idx: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, context: int = 1,
             field: RandomField | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``B x H x W`` float32 images, ``B x H x W`` uint8 labels (``(H, W) = crop``) and ``B x C``
        annotation flags of slices ``idx``, each cut as the module docstring says. ``context`` K > 1
        (2.5D): images are ``B x K x H x W``, each slice with its neighbours (:func:`neighbours`),
        cut at the same place; the label is the centre slice's. ``field``: random field-of-view
        windows of the crops (:class:`fedgin.augment.field.RandomField`; air is the plane's lowest
        value); None draws nothing for them."""
        images = np.empty((len(idx), *([context] if context > 1 else []), *crop), np.float32)
        labels = np.empty((len(idx), *crop), np.uint8)
        annotated = []
        for k, i in enumerate(idx):
            case = self.cases[self.case_of[i]]
            z = int(self.z_of[i])
            label = np.asarray(case.label[z])
            r0, c0 = crop_origin(label, crop, rng)
            window = (Ellipsis, slice(r0, r0 + crop[0]), slice(c0, c0 + crop[1]))
            plane = stack_slices(case.image, z, z + 1, context)[0] if context > 1 else np.asarray(case.image[z])
            image, cut = plane[window], label[window[1:]]
            if field is not None:
                image, cut = field(image, cut, case.modality, rng, air=float(plane.min()))
            images[k], labels[k] = image, cut
            annotated.append(case.annotated)
        return images, labels, np.stack(annotated)



def crop_origin(label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """The top-left corner of a ``crop`` in the plane of ``label``: around a labelled voxel of a
    uniformly chosen organ when the slice shows one, else uniform in the plane."""
    size = label.shape
    if any(n < c for n, c in zip(size, crop)):
        raise ValueError(f"a {size[0]} x {size[1]} plane is smaller than the {crop[0]} x {crop[1]} crop")
    organs = np.unique(label)
    organs = organs[organs > 0]
    if organs.size == 0:
        return tuple(int(rng.integers(n - c + 1)) for n, c in zip(size, crop))
    where = np.flatnonzero(label.reshape(-1) == rng.choice(organs))
    voxel = np.unravel_index(int(where[rng.integers(where.size)]), size)
    # every origin o with o <= p < o + c, inside the plane
    return tuple(int(rng.integers(max(0, p - c + 1), min(p, n - c) + 1)) for p, n, c in zip(voxel, size, crop))


def training_crop(cases: list[CaseData]) -> tuple[int, int]:
    """The crop every training slice is cut to: the tile the cases were preprocessed for, else
    their (common) plane."""
    crops = {tile_of(c) or tuple(c.image.shape[1:]) for c in cases}
    if len(crops) != 1:
        raise ValueError(f"training cases preprocessed for different crops: {sorted(crops)}")
    return crops.pop()


class BalancedSampler:
    """Batches that always mix organ slices and background slices.

    Each batch takes ``round(batch_size * foreground_fraction)`` slices showing an organ and the
    rest from slices without one (when a kind is missing, the other fills the batch).
    """

    def __init__(self, index: SliceIndex, batch_size: int, foreground_fraction: float, rng: np.random.Generator):
        self.index, self.batch_size, self.rng = index, batch_size, rng
        self.n_fg = round(batch_size * foreground_fraction)
        if len(index.foreground) == 0:
            self.n_fg = 0
        if len(index.background) == 0:
            self.n_fg = batch_size

    def batch(self) -> np.ndarray:
        fg = self.rng.choice(self.index.foreground, self.n_fg) if self.n_fg else np.empty(0, int)
        n_bg = self.batch_size - self.n_fg
        bg = self.rng.choice(self.index.background, n_bg) if n_bg else np.empty(0, int)
        return np.concatenate([fg, bg])
