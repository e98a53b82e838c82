"""The ``fedgin`` command line's parser: every subcommand, its options and their help
(``fedgin.cli`` runs them). Argument errors are :class:`UsageError`, printed as one line."""

from __future__ import annotations

import argparse

from .config import DEFAULT_PRESET, PRESET_HELP, PRESETS, STRATEGIES
from .errors import FedginError


class UsageError(FedginError):
    """A command line argparse refuses (bad choice, missing or malformed argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as fedgin's one line (no usage block); subcommands inherit it."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive(kind):
    name = "a positive integer" if kind is int else "a positive number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be {name}, got {text!r}")
        return value

    return parse


POSITIVE_INT, POSITIVE_FLOAT = _positive(int), _positive(float)


def _site(text: str):
    from .config import SiteSpec

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--site takes NAME=DATASET, got {text!r}")
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--site takes NAME=DATASET, got {text!r}")
    return SiteSpec(name=name, dataset=path)


LABEL_MAP_HELP = ("map a dataset label fedgin does not know (dataset.json name or TotalSegmentator mask "
                  "name, any case) to an organ (liver, kidney_left, kidney_right, kidneys, spleen, pancreas, "
                  "gallbladder or an alias) or to background; repeatable")


def _add_label_map(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--label-map", action="append", metavar="NAME=ORGAN|background", help=LABEL_MAP_HELP + extra)


def _add_context(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context", type=POSITIVE_INT, metavar="K",
                   help="2.5D: the model sees each slice with its neighbours, K slices in all (odd; default: the "
                        "preset's, 3 for standard, 1 (2D) for quick and paper)")


def _add_common_training(p: argparse.ArgumentParser) -> None:
    # defaults None: a resumed run tells the options given from those left out (which it takes
    # from config.json); _new_run_defaults fills in the defaults of a new run
    p.add_argument("--site", action="append", type=_site, metavar="NAME=DATASET",
                   help="a site and its dataset folder (repeat per site; required unless --resume)")
    p.add_argument("--out", required=True, help="run dir to create (or to continue, with --resume)")
    p.add_argument("--preset", choices=list(PRESETS), help=PRESET_HELP)
    p.add_argument("--scheme", choices=["abdomen5", "abdomen6"], help="label scheme (default abdomen5)")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--gin", dest="gin", action="store_true", default=None, help="GIN on training batches")
    p.add_argument("--no-gin", dest="gin", action="store_false", help="no GIN")
    p.add_argument("--ipa", dest="ipa", action="store_true", default=None,
                   help="blend two GIN draws through a smooth random mask (IPA, Ouyang et al.)")
    p.add_argument("--no-ipa", dest="ipa", action="store_false", help="plain GIN draws")
    p.add_argument("--gin-p", type=float, help="probability that a training slice goes through GIN")
    p.add_argument("--gin-views", type=int, help="GIN views of each slice per step (the batch is split between them)")
    p.add_argument("--clean-view", dest="clean_view", action="store_true", default=None,
                   help="one more view of each slice without GIN, also supervised")
    p.add_argument("--no-clean-view", dest="clean_view", action="store_false")
    p.add_argument("--consistency", type=float,
                   help="weight of the KL consistency between the views' predictions (0: off)")
    p.add_argument("--lr-schedule", choices=["poly", "constant"],
                   help="learning rate over the whole run: poly (nnU-Net's (1 - t/T)^0.9) or constant")
    p.add_argument("--no-intensity-augment", dest="intensity_augment", action="store_false", default=None,
                   help="no standard brightness/contrast/noise/gamma augmentation")
    p.add_argument("--curve-p", type=float,
                   help="probability that a training slice's intensities go through a random Bezier curve "
                        "(before GIN, for every method; default 0: off)")
    p.add_argument("--fov-p", type=float,
                   help="probability that a training crop is cut to a random field-of-view window (air outside, "
                        "intensities z-scored over the window), as a tightly cropped scan looks; for every method")
    p.add_argument("--fov-min-mm", type=POSITIVE_FLOAT,
                   help="the smallest side of a random field-of-view window, mm (default: preset)")
    _add_context(p)
    p.add_argument("--batch-size", type=POSITIVE_INT)
    p.add_argument("--lr", type=POSITIVE_FLOAT)
    p.add_argument("--steps-per-epoch", type=POSITIVE_INT, help="optimisation steps per epoch (default: preset)")
    p.add_argument("--threads", type=POSITIVE_INT, help="torch CPU threads")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="train eagerly: no torch.compile of the training step (default: compiled where a "
                        "compiler is available; FEDGIN_COMPILE=0 also turns it off)")
    p.add_argument("--split", help="split file (JSON) naming train/val/test cases per dataset")
    p.add_argument("--cache-dir", help="preprocessing cache (default $FEDGIN_CACHE_DIR or ~/.cache/fedgin)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run under its recorded configuration (RUN/config.json): every "
                        "setting comes from there; an option that would change it is refused (only --device, "
                        "--threads, --cache-dir, --no-compile and --round-timeout may differ)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false", default=None,
                   help="decide no post-processing plan (predict and evaluate then apply none)")
    _add_label_map(p, " (recorded in config.json and the checkpoints)")


NO_OVERLAYS_HELP = ("no prediction overlays on test slices in the report (they show patient images: "
                    "leave them out of published results of real scans)")


NO_POSTPROCESS_HELP = ("do not apply the model's post-processing plan (keep only the largest connected "
                       "components of the organs where that did not lower validation Dice)")


NO_QA_HELP = ("no qa.html (the interactive QA page: case table, slice viewer, organ volumes) and no qa.npz "
              "(the page's down-sampled images, kept so fedgin report can redraw it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedgin", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks, and the third-party warnings and "
                        "log lines (MONAI, Flower, Ray) that fedgin keeps out of the console by default")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fedgin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic CT + MRI sites -> FedGIN on Flower -> evaluation -> report")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=POSITIVE_INT)

    p = sub.add_parser("phantoms", help="write synthetic CT and MRI datasets (nnU-Net raw + manifest)")
    p.add_argument("--out", required=True)
    p.add_argument("--ct", type=int, default=6, help="CT cases (0: no CT site)")
    p.add_argument("--mri", type=int, default=6, help="MRI cases (0: no MRI site)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mri-partial", action="store_true",
                   help="MRI cases annotate only liver, kidneys and spleen (like CHAOS)")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate datasets and print a case table")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--scheme", default="abdomen5", choices=["abdomen5", "abdomen6"])
    _add_label_map(p)

    cache = sub.add_parser("cache", help="the preprocessing cache").add_subparsers(dest="cache_command", required=True)
    for name, text in (("info", "where the cache is, its entries and size"),
                       ("clear", "delete every preprocessed entry (recomputed when next needed)")):
        p = cache.add_parser(name, help=text)
        p.add_argument("--cache-dir", help="default: $FEDGIN_CACHE_DIR, else ~/.cache/fedgin")

    p = sub.add_parser("train", help="non-federated baselines: local (one model per site) or centralized")
    _add_common_training(p)
    p.add_argument("--mode", choices=["local", "centralized"], help="required unless --resume")
    p.add_argument("--epochs", type=POSITIVE_INT)

    p = sub.add_parser("federate", help="federated training on Flower (simulation on one machine)")
    _add_common_training(p)
    p.add_argument("--rounds", type=POSITIVE_INT)
    p.add_argument("--local-epochs", type=POSITIVE_INT)
    p.add_argument("--strategy", choices=list(STRATEGIES),
                   help="default fedavg; fedmedian / fedtrimmedavg: robust to a faulty site (3 or more sites)")
    p.add_argument("--trim-beta", type=float, help="fedtrimmedavg: fraction cut from each end "
                   "(default max(0.2, 1/sites), so one site is cut)")
    p.add_argument("--dp-clip", type=POSITIVE_FLOAT, metavar="C",
                   help="differential privacy: clip each site's update to L2 norm C (Flower's fixed clipping)")
    p.add_argument("--dp-noise", type=float, metavar="SIGMA", help="DP noise multiplier: Gaussian noise of sd "
                   "SIGMA x C on the sum of the updates (default 0: clipping only, no guarantee)")
    p.add_argument("--dp-mode", choices=["server", "client"], help="where updates are clipped (default server)")
    p.add_argument("--dp-delta", type=float, help="the delta at which the spent epsilon is reported (default 1e-5)")
    p.add_argument("--dp-drop-unclipped", action="store_true", default=None,
                   help="--dp-mode client: drop a site's update longer than C (the round then releases nothing) "
                        "instead of stopping the run")
    p.add_argument("--dp-insecure-seeded-noise", action="store_true", default=None,
                   help="DEBUGGING ONLY: seed the DP noise by the run seed, so a DP run repeats; every site knows "
                        "the seed and can remove the noise: no privacy (logged, recorded in the run)")
    p.add_argument("--secagg", action="store_true", default=None, help="Flower's SecAgg+: the server sees only the masked "
                   "sum of the sites' updates (experimental; fedavg, fedprox or fedbn; not with DP)")
    p.add_argument("--proximal-mu", type=float, help="FedProx proximal weight (default 0.01)")
    p.add_argument("--min-sites", type=POSITIVE_INT, help="finish a round when at least this many sites replied")
    p.add_argument("--round-timeout", type=POSITIVE_FLOAT, help="seconds a round waits for replies (default 1800)")

    p = sub.add_parser("experiment", help="the paper's comparison grid: scenarios x methods x seeds, and its report")
    p.add_argument("--site", action="append", type=_site, required=True, metavar="NAME=DATASET",
                   help="one CT site and one MRI site")
    p.add_argument("--scenario", default="complete",
                   help="comma-separated: complete, limited-1to1, limited-1to2, limited-1to5")
    p.add_argument("--methods",
                   help="comma-separated: local-ct, local-mri, centralized, fedavg, fedgin, each optionally with "
                        "+gin (the preset's GIN recipe), +ipa (GIN with IPA), +gin1 (the paper's plain GIN), "
                        "+ouyang (3 GIN+IPA views, consistency term), +clean (a GIN+IPA and a clean view), "
                        "+curve / +ipa-curve (random intensity curves, without / before GIN+IPA) or +fov / +gin-fov "
                        "(random field-of-view windows, without / with GIN; fedgin+fov is FedGIN with them), "
                        "the GIN ones with -pNN (NN%% of training slices through GIN), e.g. fedgin+ipa-p50")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1)
    p.add_argument("--fov-p", type=float,
                   help="random field-of-view windows for every method (default: the preset's; a +fov recipe "
                        "sets its own)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=PRESET_HELP)
    p.add_argument("--rounds", type=POSITIVE_INT, help="rounds (local/centralized: rounds x local epochs epochs)")
    p.add_argument("--local-epochs", type=POSITIVE_INT)
    p.add_argument("--steps-per-epoch", type=POSITIVE_INT)
    p.add_argument("--split")
    _add_context(p)
    p.add_argument("--folds", type=POSITIVE_INT, metavar="K",
                   help="cross-validate: K folds per site, every ground-truth patient tested once (no --split)")
    p.add_argument("--cache-dir")
    p.add_argument("--no-overlays", action="store_true", help=NO_OVERLAYS_HELP)
    _add_label_map(p, " (recorded in every run)")

    p = sub.add_parser("report", help="(re)draw tables and plots for a run or an experiment, and the QA page "
                                      "(qa.html) of a run, an evaluation or a prediction folder")
    p.add_argument("dir")
    p.add_argument("--no-overlays", action="store_true", help=NO_OVERLAYS_HELP + " (experiment dirs)")

    p = sub.add_parser("evaluate", help="per-case 3D Dice and HD95 per organ and modality, of a model "
                                        "(--model) or of label maps made by any tool (--pred)")
    scored = p.add_mutually_exclusive_group(required=True)
    scored.add_argument("--model", help="run dir or checkpoint file: predict and score")
    scored.add_argument("--pred", metavar="DIR", help="folder of label maps {case_id}.nii.gz (nnU-Net, "
                        "TotalSegmentator, fedgin predict, ...) or DICOM SEGs {case_id}.seg.dcm / .dcm, "
                        "to score as they are")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="DATASET",
                   help="reference dataset folders (repeatable)")
    p.add_argument("--ref", action="append", default=[], metavar="DATASET",
                   help="a reference dataset folder (repeatable; the same as --data)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", choices=["test", "all", "predicted"],
                   help="test: each dataset's test split (--model's default); all: every labelled case; "
                        "predicted: the labelled cases that have a prediction file (--pred's default)")
    p.add_argument("--seed", type=int, help="seed of the split for datasets without a split file "
                   "(default: the seed the model was trained with)")
    p.add_argument("--split")
    p.add_argument("--scheme", choices=["abdomen5", "abdomen6"],
                   help="--pred: the label scheme to score in (default: the predicting model's, else abdomen5)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (off by default: on a CPU it measured no faster)")
    p.add_argument("--cache-dir")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help=NO_POSTPROCESS_HELP)
    p.add_argument("--no-qa", dest="qa", action="store_false", help=NO_QA_HELP)
    _add_label_map(p, " (default: the map the model was trained with; these entries go on top)")

    p = sub.add_parser("predict", help="NIfTI or DICOM in, NIfTI label map and/or DICOM SEG out (input grid kept)")
    p.add_argument("-i", "--input", required=True, help="a NIfTI file or a folder of them, a DICOM series folder, "
                   "or a folder of DICOM series folders (one output per series)")
    p.add_argument("--series", action="append", metavar="UID",
                   help="DICOM input: predict only the series with this SeriesInstanceUID (repeatable; needed "
                        "where one folder holds several series)")
    p.add_argument("--output-type", action="append", metavar="nifti|dicom-seg",
                   help="nifti: {case}.nii.gz (default); dicom-seg: {case}.seg.dcm, a DICOM SEG referencing the "
                        "series (DICOM input only); repeatable or comma-separated, both allowed")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", required=True, help="run dir or checkpoint file")
    p.add_argument("--checkpoint", metavar="last|round_N|epoch_N",
                   help="which checkpoint of the run dir --model: last (default), round_N (federated runs) "
                        "or epoch_N (local, centralized)")
    p.add_argument("--modality", choices=["CT", "MRI", "MR"])
    p.add_argument("--masks", action="store_true", help="also one binary file per organ")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also {case}.npz: 'probabilities' (softmax, C x X x Y x Z float16 on the input's "
                        "voxel grid, before post-processing) and 'labels' (the class names in order)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (off by default: on a CPU it measured no faster)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help=NO_POSTPROCESS_HELP)
    p.add_argument("--statistics", action="store_true", help="also {case}.statistics.json: per organ the volume "
                   "(ml) and the mean and sd of the intensity inside (HU for CT), with plausibility warnings")
    p.add_argument("--no-qa", dest="qa", action="store_false", help=NO_QA_HELP)
    return parser
