"""Image augmentations applied to training batches: GIN, its IPA extension, the standard
intensity augmentation every method gets, random intensity curves and random field-of-view
windows."""

from .curve import RandomCurve
from .field import RandomField
from .gin import GIN, GINDraw
from .intensity import RandomIntensity
from .ipa import IPA

__all__ = ["GIN", "GINDraw", "IPA", "RandomCurve", "RandomField", "RandomIntensity"]
