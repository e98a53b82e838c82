"""The ``fedgin`` command line. Parses arguments, resolves one RunConfig, calls library code.

Usage and data errors, argument errors included, print one line ``fedgin: error: ...`` and exit
with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import DEFAULT_PRESET
from .data.labels import parse_label_map
from .errors import DataError, FedginError
from .arguments import UsageError, build_parser

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# idle OpenMP threads sleep instead of spinning: on 2 shared cores (Ray workers, other jobs) spinning
# threads stall each other by 10x and more
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
        "curve_p": args.curve_p,
        "fov_p": args.fov_p,
        "fov_min_mm": args.fov_min_mm,
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
                                          "lr_schedule", "intensity_augment", "curve_p", "fov_p", "fov_min_mm",
                                          "batch_size", "lr",
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


def _run_config(args, command: str, new_run):
    """The run's configuration: with ``--resume`` of a recorded run, the record (options given
    checked against it); else ``new_run(train overrides)`` after a new run's defaults."""
    recorded = _recorded(args, command)
    if recorded is not None:
        return _on_the_record(recorded, args)
    _new_run_defaults(args, command)
    return new_run(_train_overrides(args))


def cmd_train(args) -> int:
    from .config import resolve
    from .engine.runs import train_non_federated

    def new_run(overrides: dict):
        overrides.pop("local_epochs")
        return resolve(args.preset, command="train", out=args.out, sites=tuple(args.site), scheme=args.scheme,
                       train_overrides=overrides, seed=args.seed, mode=args.mode, split=args.split,
                       cache_dir=args.cache_dir, device=args.device, postprocess=args.postprocess,
                       label_map=parse_label_map(args.label_map), context=args.context)

    out = train_non_federated(_run_config(args, "train", new_run), resume=args.resume)
    print(f"done: {out}")
    return 0


def cmd_federate(args) -> int:
    from .config import resolve
    from .federated.launcher import federate

    def new_run(overrides: dict):
        overrides.pop("local_epochs")
        overrides.pop("epochs")
        return resolve(args.preset, command="federate", out=args.out, sites=tuple(args.site), scheme=args.scheme,
                       train_overrides=overrides, seed=args.seed, mode="federated", split=args.split,
                       cache_dir=args.cache_dir, device=args.device, rounds=args.rounds,
                       local_epochs=args.local_epochs, strategy=args.strategy, min_sites=args.min_sites,
                       round_timeout=args.round_timeout, postprocess=args.postprocess,
                       proximal_mu=args.proximal_mu, label_map=parse_label_map(args.label_map),
                       trim_beta=args.trim_beta, dp_clip=args.dp_clip, dp_noise=args.dp_noise,
                       dp_mode=args.dp_mode, dp_delta=args.dp_delta, secagg=args.secagg, context=args.context,
                       dp_drop_unclipped=args.dp_drop_unclipped,
                       dp_insecure_seeded_noise=args.dp_insecure_seeded_noise)

    out = federate(_run_config(args, "federate", new_run), resume=args.resume)
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
                                     context=args.context, fov_p=args.fov_p)
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
