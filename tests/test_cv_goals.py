"""``benchmarks/cv_goals.py`` on a hand-made grid record: comparisons pool only the folds both runs
finished, Dice is the mean of the organs' means, and the default model's failure share counts
organ-cases below 0.7."""

import json
from pathlib import Path

import pytest

from conftest import benchmark_module

@pytest.fixture(scope="module")
def cv_goals():
    with benchmark_module("cv_goals") as module:
        yield module


def _run(record: Path, fold: int, scenario: str, method: str, dice: dict[tuple[str, str], list[float]]) -> None:
    """A finished run's metrics.csv: ``dice[(modality, organ)]`` lists one Dice per case; pancreas
    rows without a Dice (not annotated) are written too and must be ignored."""
    path = record / f"folds/fold{fold}/runs/{scenario}/{method}/seed0/eval/metrics.csv"
    path.parent.mkdir(parents=True)
    lines = ["case,dataset,modality,organ,annotated,dice,hd95,missed,false_positive"]
    for (modality, organ), values in dice.items():
        for i, d in enumerate(values):
            lines.append(f"{modality.lower()}{i},D,{modality},{organ},True,{d},1.0,False,False")
            lines.append(f"{modality.lower()}{i},D,{modality},pancreas,False,,,,")
    path.write_text("\n".join(lines) + "\n")


def _uniform(ct: float, mri: float, cases: int = 2) -> dict:
    return {(m, o): [v] * cases for m, v in (("CT", ct), ("MRI", mri)) for o in ("liver", "kidneys", "spleen")}


def test_a_comparison_pools_only_the_folds_both_runs_finished(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    _run(record, 0, "complete", "fedgin", _uniform(0.9, 0.8))
    _run(record, 0, "complete", "fedavg", _uniform(0.9, 0.7))
    _run(record, 1, "complete", "fedgin", _uniform(0.1, 0.1))  # fedavg's fold 1 not finished: left out
    runs = cv_goals.read_runs(record)
    goal = cv_goals.difference_goal(runs, "g", ("complete", "fedgin"), ("complete", "fedavg"), "MRI", 0.01)
    assert goal["folds"] == [0] and goal["value"] == pytest.approx(0.1) and goal["met"] is True
    assert goal["per_fold"] == {0: pytest.approx(0.1)}
    # a level goal takes every finished fold of its run
    level = cv_goals.level_goal(runs, "g", ("complete", "fedgin"), "MRI", 0.9)
    assert level["folds"] == [0, 1] and level["value"] == pytest.approx(0.45) and level["met"] is False
    assert cv_goals.difference_goal(runs, "g", ("limited-1to5", "fedgin"), ("limited-1to5", "fedavg"),
                                    "MRI", 0.15)["met"] is None


def test_dice_is_the_mean_of_the_organ_means_and_failures_count_organ_cases(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    dice = _uniform(0.9, 0.9, cases=4)
    dice[("MRI", "spleen")] = [0.9, 0.9, 0.9, 0.3]  # one of 4 MRI spleens fails
    dice[("MRI", "liver")] = [0.6]  # one liver case only: it weighs as much as the 4 spleens
    _run(record, 0, "complete", "fedgin", dice)
    runs = cv_goals.read_runs(record)
    assert cv_goals.mean_dice(runs[("complete", "fedgin")][0], "MRI") == pytest.approx((0.6 + 0.9 + 0.75) / 3)
    failure = cv_goals.failure_goal(runs, ("complete", "fedgin"), "default model")
    assert failure["shares"]["MRI spleen"] == {"below": 1, "cases": 4}
    assert failure["shares"]["MRI liver"] == {"below": 1, "cases": 1}
    assert failure["value"] == 1.0 and failure["met"] is False


def test_the_script_writes_its_table_with_the_command(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    _run(record, 0, "complete", "fedgin", _uniform(0.95, 0.92))
    budget = tmp_path / "budget.json"
    budget.write_text(json.dumps({"methods": {"fedgin": {"federate_seconds": 998}}}))
    assert cv_goals.main(["--record", str(record), "--budget", str(budget), "--out", str(tmp_path / "goals")]) == 0
    result = json.loads((tmp_path / "goals.json").read_text())
    by_name = {g["goal"]: g for g in result["goals"]}
    assert by_name["default model before the windows (complete, fedgin) on MRI"]["met"] is True
    assert by_name["complete: FedGIN MRI - FedAvg MRI"]["met"] is None
    assert by_name["`fedgin federate` on the bundle (default recipe), minutes on 2 cores"]["value"] == 16.6
    text = (tmp_path / "goals.md").read_text()
    assert "python benchmarks/cv_goals.py --record" in text and "not measured yet" in text


def test_the_sign_test_is_exact_and_pairs_match_the_same_patient_and_organ(cv_goals, tmp_path):
    assert cv_goals.sign_test(0, 0) == 1.0
    assert cv_goals.sign_test(5, 5) == 1.0
    assert cv_goals.sign_test(6, 0) == pytest.approx(2 / 64)  # all six one way: 2 * (1/2)^6
    assert cv_goals.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10
    record = tmp_path / "cv3"
    a = _uniform(0.9, 0.8, cases=3)
    b = _uniform(0.9, 0.8, cases=3)
    a[("MRI", "liver")] = [0.9, 0.9, 0.7]  # better on 2 livers, worse on 1
    a[("MRI", "spleen")] = [0.85, 0.8, 0.8005]  # better on one spleen; 0.0005 counts as a tie
    _run(record, 0, "complete", "fedgin", a)
    _run(record, 0, "complete", "fedavg", b)
    runs = cv_goals.read_runs(record)
    goal = cv_goals.difference_goal(runs, "g", ("complete", "fedgin"), ("complete", "fedavg"), "MRI", 0.01)
    assert goal["pairs"] == {"wins": 3, "losses": 1, "ties": 5, "p": pytest.approx(cv_goals.sign_test(3, 1), abs=1e-4)}
    ct = cv_goals.difference_goal(runs, "g", ("complete", "fedgin"), ("complete", "fedavg"), "CT", -0.01)
    assert ct["pairs"]["ties"] == 9 and ct["pairs"]["p"] == 1.0


def test_the_method_table_gives_each_fold_and_the_pooled_mean_with_failures(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    _run(record, 0, "complete", "fedgin", _uniform(0.9, 0.8))
    low = _uniform(0.5, 0.6)
    low[("CT", "liver")] = [0.9, 0.9]
    _run(record, 1, "complete", "fedgin", low)
    _run(record, 0, "limited-1to5", "fedavg", _uniform(0.8, 0.4))
    _run(record, 0, "complete", "local-ct", _uniform(0.8, 0.1))
    table = cv_goals.method_table(cv_goals.read_runs(record))
    assert [(r["scenario"], r["method"]) for r in table] == [
        ("complete", "local-ct"), ("complete", "fedgin"), ("limited-1to5", "fedavg")]
    fedgin = table[1]
    assert fedgin["folds"] == [0, 1]
    assert fedgin["per_fold"][1]["CT"] == {"dice": pytest.approx((0.9 + 0.5 + 0.5) / 3, abs=1e-4), "below": 4, "organ_cases": 6}
    assert fedgin["pooled"]["MRI"]["dice"] == pytest.approx(0.7) and fedgin["pooled"]["MRI"]["below"] == 6
    text = cv_goals.markdown({"command": "c", "date": "d", "record": "r", "finished_runs": 4, "goals": [
        cv_goals.failure_goal(cv_goals.read_runs(record), ("complete", "fedgin"), "default model")], "methods": table})
    assert "| complete | fedgin | 0.900 (0) | 0.800 (0) | 0.633 (4) | 0.600 (6) | 0.767 (4) | 0.700 (6) | 0, 1 |" in text
    assert "| limited-1to5 | fedavg | 0.800 (0) | 0.400 (6) |  |  |" in text


def test_a_patient_every_in_domain_method_misses_is_named_and_can_be_left_out(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    hard = _uniform(0.9, 0.9)
    hard[("MRI", "spleen")] = [0.9, 0.2]  # patient mri1's spleen: missed by both MRI-trained methods
    _run(record, 0, "complete", "fedgin", hard)
    _run(record, 0, "complete", "fedavg", hard)
    other = _uniform(0.9, 0.05)  # a CT-only model misses every MRI: not in-domain, so it does not count
    other[("CT", "liver")] = [0.9, 0.5]  # ct1's liver: fedgin and fedavg score it 0.9, so it is not hard
    _run(record, 0, "complete", "local-ct", other)
    runs = cv_goals.read_runs(record)
    table = {r["case"]: r for r in cv_goals.patient_table(runs)}
    assert table["mri1"]["missed_by_every_in_domain_method"] == ["spleen"]
    assert table["mri0"]["missed_by_every_in_domain_method"] == []
    assert table["ct1"]["missed_by_every_in_domain_method"] == []
    assert table["mri1"]["dice"]["fedgin"] == pytest.approx((0.9 + 0.9 + 0.2) / 3, abs=1e-4)
    easy = cv_goals.without_hard_patients(runs, ("complete", "fedgin"), list(table.values()))
    assert easy["left_out"] == ["mri1"] and easy["MRI"] == pytest.approx(0.9) and easy["CT"] == pytest.approx(0.9)
    result = {"command": "c", "date": "d", "record": "r", "finished_runs": 3, "goals": [cv_goals.failure_goal(runs, ("complete", "fedgin"), "default model")],
              "methods": cv_goals.method_table(runs), "patients": list(table.values()),
              "default_without_hard_patients": easy}
    text = cv_goals.markdown(result)
    assert "| mri1 | 0 | MRI |" in text and "without the patients every in-domain method misses (mri1)" in text


def test_the_windows_block_appears_with_their_runs_and_is_reported_without_a_target(cv_goals, tmp_path):
    record = tmp_path / "cv3"
    _run(record, 0, "complete", "fedgin", _uniform(0.8, 0.8))
    _run(record, 0, "complete", "fedavg", _uniform(0.8, 0.7))
    assert not any("fedgin+fov" in g["goal"] for g in cv_goals.goals(cv_goals.read_runs(record), None))
    _run(record, 0, "complete", "fedgin+fov", _uniform(0.92, 0.91))
    _run(record, 0, "complete", "fedavg+fov", _uniform(0.9, 0.85))
    goals = {g["goal"]: g for g in cv_goals.goals(cv_goals.read_runs(record), None)}
    effect = goals["windows: fedgin+fov CT - fedgin CT"]
    assert effect["value"] == pytest.approx(0.12) and effect["met"] is None and effect["reported"]
    assert goals["complete, with windows: fedgin+fov MRI - fedavg+fov MRI"]["met"] is True
    assert goals["default model (complete, fedgin+fov) on MRI"]["met"] is True
    assert goals["default model (fedgin+fov): no organ below Dice 0.7 in more than 5% of cases"]["value"] == 0
    text = cv_goals.markdown({"command": "c", "date": "d", "record": "r", "finished_runs": 4,
                              "goals": list(goals.values())})
    assert "| windows: fedgin+fov CT - fedgin CT | (reported) | 0.120 |" in text
