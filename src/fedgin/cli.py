"""The ``fedgin`` command line. Parses arguments, resolves one RunConfig, calls library code.

Usage and data errors, argument errors included, print one line ``fedgin: error: ...`` and exit
with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import DEFAULT_PRESET, PRESET_HELP, PRESETS, STRATEGIES
from .data.labels import parse_label_map
from .errors import DataError, FedginError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# idle OpenMP threads sleep instead of spinning: on 2 shared cores (Ray workers, other jobs) spinning
# threads stall each other by 10x and more
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
                   help="2.5D: the model sees each slice with its neighbours, K slices in all (odd; default 1: 2D)")


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
                        "+ouyang (3 GIN+IPA views, consistency term) or +clean (a GIN+IPA and a clean view), "
                        "and those with -pNN (NN%% of training slices through GIN), e.g. fedgin+ipa-p50")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1)
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


def _train_overrides(args) -> dict:
    return {
        "gin": args.gin,
        "ipa": args.ipa,
        "gin_p": args.gin_p,
        "gin_views": args.gin_views,
        "clean_view": args.clean_view,
        "consistency": args.consistency,
        "lr_schedule": args.lr_schedule,
        "intensity_augment": args.intensity_augment,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "steps_per_epoch": args.steps_per_epoch,
        "num_threads": args.threads,
        "compile": args.compile,
        "epochs": getattr(args, "epochs", None),
        "local_epochs": None,
    }


#: argparse dest -> the RunConfig field it sets (dotted: inside ``train`` or ``model``); on
#: ``--resume`` a given option is checked against the recorded field (fedgin.config.FIELD_OPTIONS)
_RUN_FIELDS = {
    "preset": "preset", "scheme": "scheme", "seed": "seed", "mode": "mode", "rounds": "rounds",
    "local_epochs": "local_epochs", "strategy": "strategy", "min_sites": "min_sites",
    "round_timeout": "round_timeout", "proximal_mu": "proximal_mu", "trim_beta": "trim_beta", "dp_clip": "dp_clip",
    "dp_noise": "dp_noise", "dp_mode": "dp_mode", "dp_delta": "dp_delta", "dp_drop_unclipped": "dp_drop_unclipped",
    "dp_insecure_seeded_noise": "dp_insecure_seeded_noise", "secagg": "secagg", "split": "split",
    "cache_dir": "cache_dir", "device": "device", "postprocess": "postprocess", "context": "model.in_channels",
    "epochs": "train.epochs", "threads": "train.num_threads",
    **{dest: f"train.{dest}" for dest in ("gin", "ipa", "gin_p", "gin_views", "clean_view", "consistency",
                                          "lr_schedule", "intensity_augment", "batch_size", "lr",
                                          "steps_per_epoch", "compile")},
}


def _on_the_record(recorded, args):
    """A resumed run's configuration: the recorded one with the options given on this command line
    put in (the library then refuses any that change what the run computes)."""
    from dataclasses import replace

    top, nested = {"out": args.out}, {"train": {}, "model": {}}  # where the run dir is now
    for dest, field in _RUN_FIELDS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        part, _, name = field.rpartition(".")
        (nested[part] if part else top)[name] = value
    if args.label_map:
        top["label_map"] = parse_label_map(args.label_map)
    if args.site:
        top["sites"] = tuple(args.site)
    return replace(recorded, **top, train=replace(recorded.train, **nested["train"]),
                   model=replace(recorded.model, **nested["model"]))


def _recorded(args, command: str):
    """With ``--resume`` on a run dir that has a ``config.json``: that record (mode checked)."""
    from .config import read_run_config

    recorded = read_run_config(Path(args.out)) if args.resume else None
    if recorded is None:
        return None
    federated = recorded.mode == "federated"
    if federated != (command == "federate"):
        other = "fedgin federate" if federated else "fedgin train"
        raise FedginError(f"{args.out} is a {recorded.mode} run: resume it with {other} --resume")
    return recorded


def _new_run_defaults(args, command: str) -> None:
    """A new run (or ``--resume`` of a dir without config.json) needs its sites; the rest defaults."""
    needed = (("--site", "site"), ("--mode", "mode")) if command == "train" else (("--site", "site"),)
    missing = [flag for flag, dest in needed if not getattr(args, dest)]
    if missing:
        # argparse's words: only --resume of a recorded run may leave them out
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see fedgin {command} --help)")
    for dest, default in (("preset", DEFAULT_PRESET), ("scheme", "abdomen5"), ("seed", 0), ("device", "auto"),
                          ("postprocess", True), ("strategy", "fedavg")):
        if getattr(args, dest, default) is None:
            setattr(args, dest, default)


def cmd_train(args) -> int:
    from .config import resolve
    from .engine.runs import train_non_federated

    recorded = _recorded(args, "train")
    if recorded is not None:
        cfg = _on_the_record(recorded, args)
    else:
        _new_run_defaults(args, "train")
        overrides = _train_overrides(args)
        overrides.pop("local_epochs")
        cfg = resolve(args.preset, command="train", out=args.out, sites=tuple(args.site), scheme=args.scheme,
                      train_overrides=overrides, seed=args.seed, mode=args.mode, split=args.split,
                      cache_dir=args.cache_dir, device=args.device, postprocess=args.postprocess,
                      label_map=parse_label_map(args.label_map), context=args.context)
    out = train_non_federated(cfg, resume=args.resume)
    print(f"done: {out}")
    return 0


def cmd_federate(args) -> int:
    from .config import resolve
    from .federated.launcher import federate

    recorded = _recorded(args, "federate")
    if recorded is not None:
        cfg = _on_the_record(recorded, args)
    else:
        _new_run_defaults(args, "federate")
        overrides = _train_overrides(args)
        overrides.pop("local_epochs")
        overrides.pop("epochs")
        cfg = resolve(args.preset, command="federate", out=args.out, sites=tuple(args.site), scheme=args.scheme,
                      train_overrides=overrides, seed=args.seed, mode="federated", split=args.split,
                      cache_dir=args.cache_dir, device=args.device, rounds=args.rounds,
                      local_epochs=args.local_epochs, strategy=args.strategy, min_sites=args.min_sites,
                      round_timeout=args.round_timeout, postprocess=args.postprocess,
                      proximal_mu=args.proximal_mu, label_map=parse_label_map(args.label_map),
                      trim_beta=args.trim_beta, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
                      dp_mode=args.dp_mode, dp_delta=args.dp_delta, secagg=args.secagg, context=args.context,
                      dp_drop_unclipped=args.dp_drop_unclipped,
                      dp_insecure_seeded_noise=args.dp_insecure_seeded_noise)
    out = federate(cfg, resume=args.resume)
    print(f"done: {out}")
    return 0


def cmd_data_check(args) -> int:
    from .data.check import check_datasets, format_table, summary_line, warning_lines
    from .data.labels import get_scheme

    scheme = get_scheme(args.scheme)
    rows, errors = check_datasets(args.datasets, scheme, parse_label_map(args.label_map))
    if rows:
        print(format_table(rows, scheme), end="")
    for line in warning_lines(rows):
        print(f"fedgin: warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"fedgin: error: {line}", file=sys.stderr)
    print(summary_line(rows, errors, len(args.datasets)))
    return 2 if errors else 0


def cmd_cache(args) -> int:
    from .data.cache import cache_info, clear_cache, describe_cache, describe_cleared

    if args.cache_command == "clear":
        print(describe_cleared(clear_cache(args.cache_dir)))
    else:
        print(describe_cache(cache_info(args.cache_dir)))
    return 0


def cmd_phantoms(args) -> int:
    from .synthetic import write_phantom_datasets

    paths = write_phantom_datasets(args.out, args.ct, args.mri, args.seed, mri_partial=args.mri_partial)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.scoring import evaluate, mean_dice_lines

    label_map = parse_label_map(args.label_map)
    datasets = list(args.data) + list(args.ref)
    if not datasets:
        raise FedginError("evaluate needs the reference datasets: --data DATASET... or --ref DATASET")
    if args.pred is not None:
        from .evaluation.folder import evaluate_folder

        summary = evaluate_folder(args.pred, datasets, args.out, cases=args.cases or "predicted", seed=args.seed,
                                  split_file=args.split, scheme=args.scheme, label_map=label_map, qa=args.qa)
        print(f"scored {len(summary['metric_per_case'])} prediction(s) from {args.pred}")
    else:
        if args.cases == "predicted":
            raise FedginError("--cases predicted goes with --pred (a model predicts every case it scores)")
        if args.scheme is not None:
            raise FedginError("--scheme goes with --pred; a model scores in its own label scheme")
        summary = evaluate(args.model, datasets, args.out, cases=args.cases or "test", seed=args.seed,
                           split_file=args.split, device=args.device, cache_dir=args.cache_dir,
                           postprocess=args.postprocess, label_map=label_map, compile=args.compile, qa=args.qa)
    if summary.get("arguments", {}).get("normalisation"):
        print(summary["arguments"]["normalisation"])  # a FedBN model: which normalisation layers were scored
    for line in mean_dice_lines(summary):
        print(line)
    warned = sum(bool(r["statistics"]["warnings"]) for r in summary["metric_per_case"])
    print(f"wrote {args.out}/summary.json, metrics.csv, summary.md, statistics/" + (", qa.html" if args.qa else "")
          + (f"; {warned} case(s) with plausibility warnings on organ volumes" if warned else ""))
    return 0


def cmd_predict(args) -> int:
    from .evaluation.prediction import parse_output_types, predict

    written = predict(args.input, args.output, args.model, modality=args.modality, masks=args.masks,
                      device=args.device, postprocess=args.postprocess, checkpoint=args.checkpoint,
                      save_probabilities=args.save_probabilities, compile=args.compile,
                      statistics=args.statistics, qa=args.qa, series=args.series,
                      output_types=parse_output_types(args.output_type))
    print(f"wrote {len(written)} file(s) to {args.output}")
    return 0


def _comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [item for item in text.split(",") if item]


def cmd_experiment(args) -> int:
    from .experiments.recorded import run_recorded_experiment

    report = run_recorded_experiment(list(args.site), _comma_list(args.scenario), _comma_list(args.methods),
                                     args.seeds, Path(args.out), argv=sys.argv[1:], preset=args.preset,
                                     rounds=args.rounds, local_epochs=args.local_epochs,
                                     steps_per_epoch=args.steps_per_epoch, split_file=args.split,
                                     cache_dir=args.cache_dir, overlays=not args.no_overlays,
                                     label_map=parse_label_map(args.label_map), folds=args.folds,
                                     context=args.context)
    print(f"wrote {report}")
    return 0


def cmd_report(args) -> int:
    from .experiments.redraw import redraw_report

    print(f"wrote {redraw_report(args.dir, overlays=not args.no_overlays)}")
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import run_demo

    run_demo(Path(args.out), seed=args.seed, rounds=args.rounds)
    return 0


def _check_output_folders(args) -> None:
    """``--out`` and ``-o`` name folders: an existing file there is refused before any work."""
    for option, value in (("--out", getattr(args, "out", None)), ("-o", getattr(args, "output", None))):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise DataError(value, f"exists and is not a folder ({option} takes an output folder)")


COMMANDS = {
    "train": cmd_train,
    "federate": cmd_federate,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "phantoms": cmd_phantoms,
    "demo": cmd_demo,
    "experiment": cmd_experiment,
    "report": cmd_report,
    "cache": cmd_cache,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"fedgin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    from .console import set_debugging

    set_debugging(args.debug)
    try:
        _check_output_folders(args)
        if args.command == "data":
            return cmd_data_check(args)
        return COMMANDS[args.command](args)
    except FedginError as exc:
        if args.debug:
            raise
        print(f"fedgin: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedgin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
