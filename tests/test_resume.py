"""``--resume`` continues a run under its recorded configuration (issue 23): ``fedgin federate
--resume`` takes every setting from the run's ``config.json`` (a DP run resumed without the DP
flags stays a DP run), refuses in one line any option that would change what the run computes
(DP flags on a run released without noise, more rounds under a poly schedule planned for fewer)
and never rewrites the record; only where and how fast it runs may change. Flower is not started:
the tests stop at the simulation's call (the exact federated resume, with Ray, is in
test_federated; ``fedgin train --resume`` in test_engine)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import flwr.simulation
from fedgin.cli import main
from fedgin.config import RunConfig, SiteSpec, config_differences, resolve, with_execution
from fedgin.engine.runs import load_sites, with_site_facts
from fedgin.federated import server_app


class Started(Exception):
    """What the stand-in for Flower's simulation raises: the run would have started here."""


@pytest.fixture(scope="module")
def sites(phantom_datasets) -> dict[str, Path]:
    ct, mri = phantom_datasets(2, 2)
    return {"ct": ct, "mri": mri}


@pytest.fixture
def started(monkeypatch) -> list[RunConfig]:
    """The configuration the ServerApp would run under, once per federate call that gets that far."""
    runs: list[RunConfig] = []
    real = server_app.make_server_app

    def make(config_file=None, execution=None):
        cfg = RunConfig.from_dict(json.loads(Path(config_file).read_text()))
        runs.append(with_execution(cfg, execution) if execution is not None else cfg)
        return real(config_file, execution)

    def simulation(**kwargs):
        raise Started

    monkeypatch.setattr(server_app, "make_server_app", make)
    monkeypatch.setattr(flwr.simulation, "run_simulation", simulation)
    return runs


def _recorded(run: Path, sites: dict[str, Path], **options) -> bytes:
    """A federated run's config.json as ``fedgin federate`` records it (no round trained)."""
    cfg = resolve("quick", command="federate", out=str(run), sites=tuple(SiteSpec(n, str(p)) for n, p in sites.items()),
                  rounds=2, local_epochs=1, train_overrides={"steps_per_epoch": 2, "batch_size": 2, "num_threads": 1},
                  **options)
    cfg = replace(with_site_facts(cfg, load_sites(cfg)), run_id="0123456789ab")
    (run / "checkpoints").mkdir(parents=True)
    cfg.write(run / "config.json")
    return (run / "config.json").read_bytes()


def _federate(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(["federate", *map(str, args)])
    except Started:
        code = None
    return code, capsys.readouterr().err


def test_a_dp_run_resumed_without_the_dp_flags_stays_private(sites, tmp_path, capsys, started):
    run = tmp_path / "run"
    recorded = _recorded(run, sites, dp_clip=0.5, dp_noise=1.2, dp_mode="client")
    assert _federate(capsys, "--out", run, "--resume")[0] is None  # started, with nothing but --out
    cfg = started[-1]
    assert (cfg.dp_clip, cfg.dp_noise, cfg.dp_mode, cfg.rounds, cfg.run_id) == (0.5, 1.2, "client", 2, "0123456789ab")
    assert (run / "config.json").read_bytes() == recorded


def test_a_run_released_without_noise_resumed_with_dp_flags_is_refused(sites, tmp_path, capsys, started):
    run = tmp_path / "run"
    recorded = _recorded(run, sites)
    code, err = _federate(capsys, "--out", run, "--resume", "--dp-clip", "1", "--dp-noise", "1")
    assert code == 2 and started == []
    (line,) = err.splitlines()
    assert line == (f"fedgin: error: {run}: a resumed run continues under its recorded configuration (config.json), "
                    "which this one changes: --dp-clip (recorded none, now 1.0), --dp-noise (recorded 0.0, now 1.0); "
                    "drop those options (--resume takes every setting from config.json) or start a new run with "
                    "another --out")
    assert (run / "config.json").read_bytes() == recorded


@pytest.mark.parametrize("changed, named", [
    (["--rounds", "3"], "--rounds (recorded 2, now 3)"),  # the poly schedule is planned for 2
    (["--strategy", "fedprox"], "--strategy (recorded fedavg, now fedprox)"),
    (["--lr-schedule", "constant"], "--lr-schedule (recorded poly, now constant)"),
    (["--gin-p", "1"], "--gin-p (recorded 0.5, now 1.0)"),
    (["--seed", "0"], None),  # the recorded seed: repeating a setting is no change
    (["--site", "ct={ct}"], "--site (recorded ct={ct} mri={mri}, now ct={ct})"),
    (["--site", "mri={mri}", "--site", "ct={ct}"], "--site (recorded ct={ct} mri={mri}, now mri={mri} ct={ct})"),
])
def test_federate_resume_refuses_each_changed_setting_by_name(sites, tmp_path, capsys, started, changed, named):
    run = tmp_path / "run"
    recorded = _recorded(run, sites)
    code, err = _federate(capsys, "--out", run, "--resume", *(a.format(**sites) for a in changed))
    if named is None:
        assert code is None and started[-1].seed == 0
    else:
        assert code == 2 and started == []
        (line,) = err.splitlines()
        assert named.format(**sites) in line, line
    assert (run / "config.json").read_bytes() == recorded


def test_where_and_how_fast_a_resumed_run_runs_may_change(sites, tmp_path, capsys, started):
    run = tmp_path / "run"
    recorded = _recorded(run, sites)
    args = ["--out", run, "--resume", "--device", "cpu", "--threads", "2", "--no-compile", "--round-timeout", "60",
            "--cache-dir", tmp_path / "cache"]
    assert _federate(capsys, *args)[0] is None
    cfg = started[-1]
    assert (cfg.device, cfg.train.num_threads, cfg.train.compile, cfg.round_timeout, cfg.cache_dir) == \
        ("cpu", 2, False, 60.0, str(tmp_path / "cache"))
    assert (run / "config.json").read_bytes() == recorded  # the record keeps what it recorded


def test_resume_of_a_train_run_names_the_command(sites, tmp_path, capsys, started):
    run = tmp_path / "run"
    run.mkdir()
    resolve("quick", command="train", out=str(run), sites=(SiteSpec("ct", str(sites["ct"])),),
            mode="local").write(run / "config.json")
    code, err = _federate(capsys, "--out", run, "--resume")
    assert code == 2 and err == f"fedgin: error: {run} is a local run: resume it with fedgin train --resume\n"


def test_the_differences_are_the_settings_and_the_sites_data(tmp_path):
    cfg = resolve("quick", command="federate", out=str(tmp_path / "a"), sites=(SiteSpec("ct", str(tmp_path / "ct")),))
    cfg = replace(cfg, sites=(replace(cfg.sites[0], modality="CT", split="seeded (seed 0)", train_slices=40),))
    same = replace(cfg, out="elsewhere", run_id="x", command="flwr run", device="cuda", round_timeout=5.0,
                   train=replace(cfg.train, num_threads=8, compile=False))
    assert config_differences(cfg, same) == []
    # the same dataset by another spelling of its path is the same site
    relative = replace(cfg, sites=(replace(cfg.sites[0], dataset=str(tmp_path / "x" / ".." / "ct")),))
    assert config_differences(cfg, relative) == []
    # the site's data changed (more training slices) while no setting did
    grown = replace(cfg, sites=(replace(cfg.sites[0], train_slices=44),))
    assert config_differences(cfg, grown) == [("sites.ct.train_slices", 40, 44)]
    # facts the new config does not know yet (read later) are no difference
    unread = replace(cfg, sites=(SiteSpec("ct", str(tmp_path / "ct")),))
    assert config_differences(cfg, unread) == []
    assert config_differences(cfg, replace(cfg, model=replace(cfg.model, in_channels=3))) == \
        [("model.in_channels", 1, 3)]


def test_a_moved_run_dir_resumes_where_it_is_now(sites, tmp_path, capsys, started):
    recorded = _recorded(tmp_path / "run", sites)
    (tmp_path / "run").rename(tmp_path / "moved")
    assert _federate(capsys, "--out", tmp_path / "moved", "--resume")[0] is None
    assert started[-1].out == str(tmp_path / "moved")
    assert (tmp_path / "moved" / "config.json").read_bytes() == recorded


def test_a_dp_run_whose_checkpoint_lost_its_account_is_not_continued(tmp_path):
    """The account of the rounds already released must continue; a DP run's checkpoint without it
    (a run recorded without DP, its config.json edited) would restart it at zero: refused."""
    from fedgin.data.labels import get_scheme
    from fedgin.engine.checkpoint import save_checkpoint
    from fedgin.engine.model import build_model
    from fedgin.errors import FedginError

    cfg = resolve("quick", command="federate", out=str(tmp_path), sites=(SiteSpec("ct", "-"), SiteSpec("mri", "-")),
                  rounds=3, dp_clip=1.0, dp_noise=1.0)
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", build_model(cfg.model).state_dict(), model_config=cfg.model,
                    scheme=get_scheme(cfg.scheme), preprocess=cfg.preprocess, sites=[],
                    meta={"mode": "federated", "round": 1}, extra={"strategy_state": {}})
    with pytest.raises(FedginError, match="the checkpoint of round 1 holds no privacy account"):
        server_app.run_server(None, cfg, log=lambda _: None)
