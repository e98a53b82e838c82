"""Train / validation / test splits of a dataset.

A split file given by the user (JSON: ``{dataset_name: {"train": [...], "val": [...], "test": [...]}}``)
wins, and naming a case the dataset lacks is an error. fedgin ships one for the shared real bundle;
it applies only to a dataset of that name whose cases it all names (a user's own dataset that
happens to share the folder name gets a seeded split instead). Any other dataset is split by seed: a
fixed fraction for test, one or two cases for validation, the rest for training. ``Split.source``
says which was used; runs record it per site in ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    #: where it came from: "file PATH", "shipped NAME.json" or "seeded (seed N)"
    source: str = "seeded"

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test), "source": self.source}


def seeded_split(case_ids: list[str], seed: int, test_fraction: float = 0.25) -> Split:
    """A deterministic split: ``test_fraction`` of cases for test (at least 1 when >= 3 cases),
    1 validation case (2 from 12 cases on), the rest training."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    ids = [ids[i] for i in order]
    n = len(ids)
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    n_val = (2 if n >= 12 else 1) if n - n_test >= 3 else 0
    return Split(
        train=tuple(sorted(ids[n_test + n_val:])),
        val=tuple(sorted(ids[n_test:n_test + n_val])),
        test=tuple(sorted(ids[:n_test])),
        source=f"seeded (seed {seed})",
    )


def builtin_split_files() -> list[Path]:
    """Split files shipped with fedgin (``fedgin/splits/*.json``)."""
    folder = resources.files("fedgin") / "splits"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json"))


def _from_file(path: Path, dataset_name: str, source: str) -> Split | None:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(path, "split file not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None
    entry = data.get("datasets", data).get(dataset_name)
    if entry is None:
        return None
    return Split(*(tuple(entry.get(k, [])) for k in ("train", "val", "test")), source=source)


def split_for(dataset_name: str, case_ids: list[str], seed: int, split_file: str | None = None) -> Split:
    """The split of a dataset: from ``split_file`` if it names the dataset (its case ids must
    exist), else from a shipped file that names the dataset and only cases it has, else
    :func:`seeded_split`."""
    if split_file:
        split = _from_file(Path(split_file), dataset_name, f"file {split_file}")
        if split is not None:
            unknown = sorted(set(split.train + split.val + split.test) - set(case_ids))
            if unknown:
                raise DataError(split_file, f"{dataset_name}: unknown case ids {unknown}")
            return split
        return seeded_split(case_ids, seed)
    for path in builtin_split_files():
        split = _from_file(path, dataset_name, f"shipped {path.name}")
        if split is not None and set(split.train + split.val + split.test) <= set(case_ids):
            return split
    return seeded_split(case_ids, seed)
