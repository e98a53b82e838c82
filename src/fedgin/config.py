"""One typed configuration for every command, resolved once and written to ``config.json``.

Presets hold the only copy of the defaults: ``standard`` (the commands' default) is sized for 2 CPU
cores at the budget where validation Dice reaches its plateau, ``quick`` is the same recipe at a
sixth of the steps (smoke tests, a first look), ``paper`` follows FedGIN's settings for a GPU
(2D U-Net 32-64-128-256, AdamW lr 5e-4, weight decay 1e-4, batch 8, 256 x 256 slices). The CLI
only overrides fields; it never restates a default.
"""

from __future__ import annotations

import json
import platform
import sys
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .data.preprocess import PreprocessConfig

LR_SCHEDULES = ("poly", "constant")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the U-Net; it travels inside every checkpoint.

    ``channels`` are the feature maps per level (the paper's 2D U-Net: 32-64-128-256); the
    ``quick`` preset halves them for 2 CPU cores. ``norm`` is ``"instance"`` (default: affine
    instance norm, as nnU-Net; per-image statistics, so GIN's wildly varying training intensities
    leave no running statistics that mismatch clean test images) or ``"batch"``. FedBN keeps the
    normalisation layers' parameters local either way.
    """

    spatial_dims: int = 2
    # input slices: 1 (2D), or K (odd) for 2.5D, each slice with its (K - 1) / 2 neighbours on
    # either side as channels (edge slices repeat), the target the centre slice
    in_channels: int = 1
    out_channels: int = 6
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    norm: str = "instance"
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        data["strides"] = tuple(data["strides"])
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """The local trainer's settings (shared by local, centralized and federated modes).

    ``steps_per_epoch`` None means one pass over the site's training slices; ``gin_p`` is the
    per-sample probability that a training slice goes through GIN. ``lr_schedule`` ``poly``
    (nnU-Net's ``(1 - step / total) ** poly_exponent`` over the whole run, every mode) or
    ``constant``. ``intensity_augment``: the standard brightness/contrast/noise/gamma augmentation
    every method gets (GIN comes on top). ``gin_views`` GIN views of each slice per step,
    ``clean_view`` one more view without GIN, ``consistency`` the weight of the KL between the
    views' predictions (Ouyang et al.); a step always takes ``batch_size`` images. ``compile``:
    the training step through ``torch.compile`` where a compiler is available
    (:mod:`fedgin.engine.compiled`; ``FEDGIN_COMPILE=0`` turns it off for the process).
    ``curve_p``: the per-sample probability of a random Bezier intensity curve
    (:class:`fedgin.augment.RandomCurve`), after the standard augmentation and before GIN, for
    every method (GIN or not); 0 is off. ``fov_p``: the per-sample probability that a training
    crop is cut to a random field-of-view window (:class:`fedgin.augment.RandomField`: each side
    between ``fov_min_mm`` and the crop, air outside, z-scored again over the window), for every
    method; 0 is off.
    """

    epochs: int = 20
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-4
    steps_per_epoch: int | None = None
    foreground_fraction: float = 0.5
    gin: bool = True
    gin_p: float = 1.0
    ipa: bool = False
    gin_views: int = 1
    clean_view: bool = False
    consistency: float = 0.0
    lr_schedule: str = "poly"
    poly_exponent: float = 0.9
    intensity_augment: bool = True
    curve_p: float = 0.0
    fov_p: float = 0.0
    fov_min_mm: float = 150.0

    spatial_augment: bool = True
    proximal_mu: float = 0.0
    amp: bool = True
    compile: bool = True
    num_threads: int | None = None
    validate: bool = True

    def __post_init__(self):
        if self.gin_views < 1:
            raise ValueError(f"gin_views must be at least 1, got {self.gin_views}")
        if self.consistency < 0:
            raise ValueError(f"consistency must be >= 0, got {self.consistency}")
        if not 0.0 <= self.gin_p <= 1.0:
            raise ValueError(f"gin_p must be in [0, 1], got {self.gin_p}")
        if not 0.0 <= self.curve_p <= 1.0:
            raise ValueError(f"curve_p must be in [0, 1], got {self.curve_p}")
        if not 0.0 <= self.fov_p <= 1.0:
            raise ValueError(f"fov_p must be in [0, 1], got {self.fov_p}")
        if self.fov_min_mm <= 0:
            raise ValueError(f"fov_min_mm must be positive, got {self.fov_min_mm}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")


@dataclass(frozen=True)
class SiteSpec:
    """A site: a name and one dataset folder (one modality); ``split`` records which split the run
    used for it (``Split.source``) and ``train_slices`` its number of training slices (the weight
    SecAgg+ must bound before the first round), filled in once the data is read."""

    name: str
    dataset: str
    modality: str | None = None
    split: str | None = None
    train_slices: int | None = None


def new_run_id() -> str:
    """A fresh run identity (12 hex digits, random)."""
    return uuid.uuid4().hex[:12]


def recorded_run_id(out: Path) -> str | None:
    """The run id in ``out/config.json`` (None if there is none, or the run predates run ids)."""
    path = Path(out) / "config.json"
    try:
        return json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


#: the federated aggregation strategies (fedgin.federated.strategy)
STRATEGIES = ("fedavg", "fedprox", "fedbn", "fedadam", "fedmedian", "fedtrimmedavg")
#: aggregators that one faulty or hostile site cannot move arbitrarily (they need 3 or more sites)
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; written to ``RUN/config.json``."""

    command: str
    out: str
    sites: tuple[SiteSpec, ...]
    preset: str = "quick"
    scheme: str = "abdomen5"
    seed: int = 0
    mode: str = "federated"  # local | centralized | federated
    rounds: int = 10
    local_epochs: int = 2
    strategy: str = "fedavg"
    min_sites: int | None = None
    round_timeout: float = 1800.0  # seconds a round waits for sites' replies
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    # FedTrimmedAvg's fraction cut from each end per coordinate (None: max(0.2, 1 / sites), so at
    # least one site's value is cut)
    trim_beta: float | None = None
    # differential privacy with Flower's fixed-clipping wrappers (fedgin.federated.privacy): the L2
    # bound of a site's update (None: no DP), the noise multiplier (Gaussian noise of sd
    # dp_noise x dp_clip on the sum of the clipped updates), where the clipping happens (server or
    # client), and the delta at which the spent epsilon is reported
    dp_clip: float | None = None
    dp_noise: float = 0.0
    dp_mode: str = "server"
    dp_delta: float = 1e-5
    # debugging only: the DP noise seeded by the run seed and round, so a DP run repeats, and any
    # site (which knows the seed) can remove it: no privacy (logged at every run, in the record)
    dp_insecure_seeded_noise: bool = False
    # client-side DP: drop an update longer than dp_clip instead of stopping the run
    dp_drop_unclipped: bool = False
    # Flower's SecAgg+: the server sees only the masked sum of the sites' updates (experimental)
    secagg: bool = False
    split: str | None = None
    train_cases: dict[str, list[str]] | None = None  # site -> the only training cases it may use
    cache_dir: str | None = None
    device: str = "auto"
    postprocess: bool = True  # decide a post-processing plan on validation cases (fedgin.engine.postprocess)
    # --label-map: source label name (lower case) -> fine organ, alias or "background"; None: none
    label_map: dict[str, str] | None = None
    # the run's identity, drawn when its run dir is created and kept on --resume; a site keys its
    # state (optimiser, FedBN layers) by it, so two runs sharing a SuperNode's state-dir never mix.
    # None: a run from before fedgin recorded one (its sites keep state-dir/<site>/ as then)
    run_id: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sites"] = [asdict(s) for s in self.sites]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        data.pop("versions", None)
        data["sites"] = tuple(SiteSpec(**s) for s in data["sites"])
        data["model"] = ModelConfig.from_dict(data["model"])
        data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        data["train"] = TrainConfig(**data["train"])
        return cls(**data)

    def write(self, path: Path) -> None:
        payload = self.to_dict()
        payload["versions"] = package_versions()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(path)


#: RunConfig fields a resumed run may set anew: where and how fast it runs, not what it computes
#: (``--device``, ``--cache-dir``, ``--round-timeout``, ``--threads``, ``--no-compile``); the rest of
#: a resumed run comes from its ``config.json``, and a different value is refused
EXECUTION_FIELDS = ("device", "cache_dir", "round_timeout", "train.num_threads", "train.compile")
#: where the run is, what started it and its identity: not part of what it computes
_NOT_COMPARED = ("command", "out", "run_id", "sites")
#: what a site's data says about it (``with_site_facts``): compared where both configs know it
SITE_FACTS = ("modality", "split", "train_slices")


#: the command-line option that sets a RunConfig field (the one-line refusal of a resume names it)
FIELD_OPTIONS = {
    "preset": "--preset", "scheme": "--scheme", "seed": "--seed", "mode": "--mode", "rounds": "--rounds",
    "local_epochs": "--local-epochs", "strategy": "--strategy", "min_sites": "--min-sites",
    "proximal_mu": "--proximal-mu", "trim_beta": "--trim-beta", "dp_clip": "--dp-clip", "dp_noise": "--dp-noise",
    "dp_mode": "--dp-mode", "dp_delta": "--dp-delta", "dp_insecure_seeded_noise": "--dp-insecure-seeded-noise",
    "dp_drop_unclipped": "--dp-drop-unclipped", "secagg": "--secagg", "split": "--split",
    "postprocess": "--no-postprocess", "label_map": "--label-map", "sites": "--site",
    "model.in_channels": "--context", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
    "train.lr": "--lr", "train.steps_per_epoch": "--steps-per-epoch", "train.gin": "--gin/--no-gin",
    "train.gin_p": "--gin-p", "train.ipa": "--ipa/--no-ipa", "train.gin_views": "--gin-views",
    "train.clean_view": "--clean-view", "train.consistency": "--consistency", "train.lr_schedule": "--lr-schedule",
    "train.intensity_augment": "--no-intensity-augment", "train.curve_p": "--curve-p",
    "train.fov_p": "--fov-p", "train.fov_min_mm": "--fov-min-mm",
}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("model", "preprocess", "train"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    return a == b or Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def config_differences(recorded: RunConfig, new: RunConfig) -> list[tuple[str, object, object]]:
    """``(field, recorded value, new value)`` for every field in which ``new`` would compute
    something else than the recorded run: the recipe, schedule, privacy, data and sites; not the
    execution fields, the run dir or the run id. Dotted names (``train.lr``); a site's dataset as
    ``sites``; where no setting differs, a fact the site's data gave (``SITE_FACTS``: its data
    changed) as ``sites.<name>.<fact>``."""
    old = _flat(json.loads(json.dumps(recorded.to_dict())))
    cur = _flat(json.loads(json.dumps(new.to_dict())))
    differ = []
    for key in old.keys() | cur.keys():
        if key in _NOT_COMPARED or key in EXECUTION_FIELDS:
            continue
        a, b = old.get(key), cur.get(key)
        if key == "split" and _same_path(a, b):
            continue
        if a != b:
            differ.append((key, a, b))
    if [s.name for s in recorded.sites] != [s.name for s in new.sites] or not all(
            _same_path(a.dataset, b.dataset) for a, b in zip(recorded.sites, new.sites)):
        differ.append(("sites", " ".join(f"{s.name}={s.dataset}" for s in recorded.sites),
                       " ".join(f"{s.name}={s.dataset}" for s in new.sites)))
    elif not differ:  # the facts follow from the data and the settings: a changed setting explains them
        for a, b in zip(recorded.sites, new.sites):
            for fact in SITE_FACTS:
                va, vb = getattr(a, fact), getattr(b, fact)
                if va is not None and vb is not None and va != vb:
                    differ.append((f"sites.{a.name}.{fact}", va, vb))
    return sorted(differ, key=lambda d: d[0])


def with_execution(recorded: RunConfig, new: RunConfig) -> RunConfig:
    """The recorded run with ``new``'s execution fields (``EXECUTION_FIELDS``) and run dir (a run
    dir moved since it was recorded continues where it is now)."""
    top = {k: getattr(new, k) for k in (*EXECUTION_FIELDS, "out") if "." not in k}
    train = {k.split(".", 1)[1]: getattr(new.train, k.split(".", 1)[1]) for k in EXECUTION_FIELDS
             if k.startswith("train.")}
    return replace(recorded, **top, train=replace(recorded.train, **train))


def read_run_config(out: Path) -> RunConfig | None:
    """The run's recorded ``out/config.json`` (None if there is none); a damaged one refused in one line."""
    from .errors import FedginError

    path = Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise FedginError(f"{path}: damaged or not a fedgin run configuration ({type(exc).__name__}: {exc})") from None


PRESETS: dict[str, dict] = {
    "quick": {
        "model": ModelConfig(channels=(16, 32, 64, 128)),
        "preprocess": PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(128, 128)),
        # 2e-3 / 5e-4 measured on phantoms: 1e-3 reaches the small organs within a few hundred
        # CPU steps where the paper's 5e-4 has not yet left background (docs/results/model_size.md)
        # GIN + IPA on half of the slices: the one GIN recipe that did not cost FedAvg's Dice in the
        # federated probe at this budget (docs/results.md, 'Which GIN recipe?')
        "train": TrainConfig(epochs=20, steps_per_epoch=50, lr=1e-3, ipa=True, gin_p=0.5),
        "rounds": 10,
        "local_epochs": 2,
    },
    # quick's model and recipe at a converged budget, the default of train, federate and experiment:
    # 60 rounds x 2 local epochs x 50 steps = 6000 steps per site, where the validation Dice of
    # FedGIN and FedAvg on the real bundle is within 0.01 of its plateau (4800-6400 steps; the
    # 8000-step curves in docs/results/time_to_accuracy.json); `fedgin train` gets the same steps.
    # 2.5D (3 slices in, --context 3): on the sites' validation cases 0.907 / 0.911 (CT / MRI)
    # against 0.895 / 0.904 in 2D at this budget, and twice the zero-shot MRI Dice of a CT-only
    # model (docs/results.md, '2.5D context'); --context 1 gives the 2D model.
    # Random field-of-view windows on half of the slices (--fov-p 0.5; --fov-p 0 turns them off):
    # on the 3-fold grid's validation cases FedGIN with them scores 0.722 against 0.684 on the one
    # tightly cropped CT (fold 0), 0.765 against 0.565 on fold 2's validation CT cropped to 179 mm,
    # and whole fields +0.009 CT / -0.011 MRI (within the folds' spread) (docs/results.md, 'Tight
    # fields of view'); `quick` and `paper` keep whole fields
    "standard": {
        "model": ModelConfig(channels=(16, 32, 64, 128), in_channels=3),
        "preprocess": PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(128, 128)),
        "train": TrainConfig(epochs=120, steps_per_epoch=50, lr=1e-3, ipa=True, gin_p=0.5, fov_p=0.5),
        "rounds": 60,
        "local_epochs": 2,
    },
    "paper": {
        "model": ModelConfig(channels=(32, 64, 128, 256)),
        "preprocess": PreprocessConfig(spacing_mm=(1.25, 1.25), slice_size=(256, 256)),
        "train": TrainConfig(epochs=100, steps_per_epoch=None),
        "rounds": 50,
        "local_epochs": 2,
    },
}


#: What train, federate and experiment use without --preset: the converged budget.
DEFAULT_PRESET = "standard"
PRESET_HELP = ("standard (default): 60 rounds x 2 local epochs x 50 steps on a 2.5 mm grid, the budget where "
               "validation Dice reaches its plateau, 2.5D (3 slices in), sized for 2 CPU cores; quick: 10 "
               "rounds in 2D (smoke tests, a first look); paper: FedGIN's settings for a GPU")


def resolve(
    preset: str,
    *,
    command: str,
    out: str,
    sites: tuple[SiteSpec, ...],
    scheme: str = "abdomen5",
    train_overrides: dict | None = None,
    context: int | None = None,
    **overrides,
) -> RunConfig:
    """A :class:`RunConfig` from a preset plus explicit overrides (``None`` values are ignored);
    ``context`` K (odd): 2.5D, the model sees each slice with its K - 1 neighbours as input
    channels (``ModelConfig.in_channels``)."""
    from .data.labels import get_scheme
    from .errors import FedginError

    if preset not in PRESETS:
        raise FedginError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    num_classes = get_scheme(scheme).num_classes
    model = replace(base["model"], out_channels=num_classes)
    if context is not None:
        if context < 1 or context % 2 == 0:
            raise FedginError(f"--context must be an odd number of slices (1, 3, 5, ...), got {context}")
        model = replace(model, in_channels=context)
    try:
        train = replace(base["train"], **{k: v for k, v in (train_overrides or {}).items() if v is not None})
    except ValueError as exc:
        raise FedginError(str(exc)) from None
    consistency = (train_overrides or {}).get("consistency")
    if consistency:  # asked for: the KL term needs two or more views of each slice, which need GIN
        views = max(1, train.gin_views) + int(train.clean_view)
        if not train.gin or views < 2:
            why = "GIN is off (--no-gin)" if not train.gin else "each slice has one view"
            raise FedginError(f"--consistency {consistency:g} would do nothing: {why}; it needs GIN with "
                              "--gin-views 2 or more, or --clean-view")
    fields = {k: v for k, v in overrides.items() if v is not None}
    fields.setdefault("rounds", base["rounds"])
    fields.setdefault("local_epochs", base["local_epochs"])
    return RunConfig(
        command=command,
        out=out,
        sites=sites,
        preset=preset,
        scheme=scheme,
        model=model,
        preprocess=base["preprocess"],
        train=train,
        **fields,
    )


def package_versions() -> dict:
    """Versions written next to every output (provenance)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("fedgin", "torch", "monai", "flwr", "numpy", "nibabel", "pydicom", "highdicom"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
