"""The preprocessing cache: a hit skips reading and preprocessing and returns the same arrays; a
changed file, setting or scheme misses; a damaged entry is recomputed; the data is never written.
An entry is a folder of ``.npy`` arrays and ``meta.json``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import SHAPE, phantom_case
from fedgin.data import cache as cache_module
from fedgin.data.cache import cache_key, default_cache_dir, load_case
from fedgin.data.datasets import open_dataset
from fedgin.data.labels import get_scheme
from fedgin.data.nifti import write_volume
from fedgin.data.preprocess import PreprocessConfig, Preprocessed

ABDOMEN5 = get_scheme("abdomen5")
CFG = PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32))


@pytest.fixture
def preprocess_calls(monkeypatch) -> list:
    """Records every call of the real preprocess made by the cache."""
    calls: list = []
    real = cache_module.preprocess

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "preprocess", spy)
    return calls


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "preprocessed").glob("*") if p.is_dir() and not p.name.startswith(".tmp-"))


def _files(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _same(a: Preprocessed, b: Preprocessed) -> bool:
    return (np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype
            and np.array_equal(a.label, b.label) and a.label.dtype == b.label.dtype
            and a.geometry == b.geometry)


def test_second_load_is_served_from_the_cache(make_nnunet, tmp_path, preprocess_calls):
    root = make_nnunet()
    case = open_dataset(root, ABDOMEN5).cases[0]
    data_before = _digest(root)
    cache_dir = tmp_path / "cache"

    first = load_case(case, ABDOMEN5, CFG, cache_dir)
    assert len(preprocess_calls) == 1
    entries = _entries(cache_dir)
    assert [p.name for p in entries] == [f"case_000-{cache_key(case, ABDOMEN5, CFG)}"]
    assert sorted(_files(entries[0])) == ["image.npy", "label.npy", "meta.json"]
    stamp = (entries[0] / "image.npy").stat().st_mtime_ns

    second = load_case(case, ABDOMEN5, CFG, cache_dir)

    assert len(preprocess_calls) == 1  # not preprocessed again
    assert _same(first, second)
    assert _same(second, load_case(case, ABDOMEN5, CFG, use_cache=False))
    assert _entries(cache_dir) == entries and (entries[0] / "image.npy").stat().st_mtime_ns == stamp
    assert not list((cache_dir / "preprocessed").glob(".tmp-*"))
    assert _digest(root) == data_before  # the dataset is only read


def test_a_hit_does_not_read_the_volumes(make_nnunet, tmp_path, monkeypatch):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    first = load_case(case, ABDOMEN5, CFG, tmp_path / "cache")

    def no_read(self, scheme):
        raise AssertionError("a cache hit must not read the NIfTI files")

    monkeypatch.setattr(type(case), "read", no_read)
    assert _same(load_case(case, ABDOMEN5, CFG, tmp_path / "cache"), first)


def test_a_rewritten_input_file_is_recomputed(make_nnunet, tmp_path, preprocess_calls):
    root = make_nnunet()
    case = open_dataset(root, ABDOMEN5).cases[0]
    cache_dir = tmp_path / "cache"
    first = load_case(case, ABDOMEN5, CFG, cache_dir)
    key = cache_key(case, ABDOMEN5, CFG)

    image, _ = phantom_case(SHAPE, seed=0)
    image[image > 100] = 200  # kidneys brighter
    write_volume(case.image, image, np.diag([1.5, 1.5, 3.0, 1.0]))

    second = load_case(case, ABDOMEN5, CFG, cache_dir)

    assert cache_key(case, ABDOMEN5, CFG) != key
    assert len(preprocess_calls) == 2
    assert not np.array_equal(first.image, second.image)
    assert _same(second, load_case(case, ABDOMEN5, CFG, use_cache=False))
    assert len(_entries(cache_dir)) == 2


def test_a_rewritten_label_is_recomputed(make_nnunet, tmp_path, preprocess_calls):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    cache_dir = tmp_path / "cache"
    load_case(case, ABDOMEN5, CFG, cache_dir)

    write_volume(case.label, phantom_case(SHAPE, organs={"liver": 1})[1], np.diag([1.5, 1.5, 3.0, 1.0]))
    second = load_case(case, ABDOMEN5, CFG, cache_dir)

    assert len(preprocess_calls) == 2
    assert set(np.unique(second.label)) == {0, 1}


@pytest.mark.parametrize(
    "changed",
    [
        PreprocessConfig(spacing_mm=(2.5, 2.5), slice_size=(32, 32)),
        PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(48, 32)),
        PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32), ct_window_hu=(-160.0, 240.0)),
        PreprocessConfig(spacing_mm=(1.5, 1.5), slice_size=(32, 32), mri_percentiles=(1.0, 99.0)),
    ],
    ids=["spacing", "slice_size", "ct_window", "mri_percentiles"],
)
def test_a_changed_setting_is_a_new_entry(make_nnunet, tmp_path, preprocess_calls, changed):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    cache_dir = tmp_path / "cache"
    load_case(case, ABDOMEN5, CFG, cache_dir)

    result = load_case(case, ABDOMEN5, changed, cache_dir)

    assert cache_key(case, ABDOMEN5, changed) != cache_key(case, ABDOMEN5, CFG)
    assert len(preprocess_calls) == 2
    assert len(_entries(cache_dir)) == 2
    load_case(case, ABDOMEN5, CFG, cache_dir)  # the first entry is still there
    assert len(preprocess_calls) == 2
    assert _same(result, load_case(case, ABDOMEN5, changed, use_cache=False))


def test_a_change_to_the_preprocessing_code_is_a_new_entry(make_nnunet, tmp_path, preprocess_calls, monkeypatch):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    load_case(case, ABDOMEN5, CFG, tmp_path)
    assert len(cache_module.code_version()) == 16
    monkeypatch.setattr(cache_module, "code_version", lambda: "another-version")
    load_case(case, ABDOMEN5, CFG, tmp_path)
    assert len(preprocess_calls) == 2 and len(_entries(tmp_path)) == 2


def test_the_scheme_is_part_of_the_key(make_nnunet, tmp_path, preprocess_calls):
    root = make_nnunet()
    abdomen6 = get_scheme("abdomen6")
    cache_dir = tmp_path / "cache"
    five = load_case(open_dataset(root, ABDOMEN5).cases[0], ABDOMEN5, CFG, cache_dir)

    six = load_case(open_dataset(root, abdomen6).cases[0], abdomen6, CFG, cache_dir)

    assert len(preprocess_calls) == 2
    assert five.label.max() == 5 and six.label.max() == 6


#: (file of the entry, damage): what a crash, a full disk or a stray write leaves. A flipped byte
#: inside an array's data is not detected (the arrays carry no checksum: training reads them a slice
#: at a time); one in a header or in meta.json is.
DAMAGE = {
    "empty": ("image.npy", lambda data: b""),
    "garbage": ("image.npy", lambda data: b"not an npy file\n" * 50),
    "truncated": ("image.npy", lambda data: data[: len(data) // 2]),
    "tail-cut": ("label.npy", lambda data: data[:-20]),
    "header-flipped": ("image.npy", lambda data: data[:8] + bytes(b ^ 0xA5 for b in data[8:40]) + data[40:]),
    "meta-garbage": ("meta.json", lambda data: b"{not json"),
    "meta-missing": ("meta.json", None),
    "label-missing": ("label.npy", None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_recomputed(make_nnunet, tmp_path, preprocess_calls, damage):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    cache_dir = tmp_path / "cache"
    first = load_case(case, ABDOMEN5, CFG, cache_dir)
    (entry,) = _entries(cache_dir)
    good = _files(entry)
    name, harm = DAMAGE[damage]
    if harm is None:
        (entry / name).unlink()
    else:
        (entry / name).write_bytes(harm(good[name]))

    again = load_case(case, ABDOMEN5, CFG, cache_dir)

    assert len(preprocess_calls) == 2
    assert _same(again, first)
    assert _entries(cache_dir) == [entry] and _files(entry) == good  # rewritten whole


def test_no_cache_writes_nothing(make_nnunet, tmp_path, preprocess_calls):
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]
    load_case(case, ABDOMEN5, CFG, tmp_path / "cache", use_cache=False)
    assert not (tmp_path / "cache").exists()
    assert not (default_cache_dir() / "preprocessed").exists()


def test_default_cache_dir_comes_from_the_environment(make_nnunet, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGIN_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    case = open_dataset(make_nnunet(), ABDOMEN5).cases[0]

    load_case(case, ABDOMEN5, CFG)

    assert len(_entries(tmp_path / "env-cache")) == 1


def test_default_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDGIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedgin"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedgin"


def test_tests_never_use_the_home_cache():
    assert os.environ["FEDGIN_CACHE_DIR"] != str(Path.home() / ".cache" / "fedgin")
    assert default_cache_dir() == Path(os.environ["FEDGIN_CACHE_DIR"])


def test_cache_info_and_clear_count_and_remove_only_the_entries(make_nnunet, tmp_path, capsys, preprocess_calls):
    from fedgin.cli import main

    root = make_nnunet()
    cache_dir = tmp_path / "cache"
    for case in open_dataset(root, ABDOMEN5).cases[:2]:
        load_case(case, ABDOMEN5, CFG, cache_dir)
    (cache_dir / "preprocessed" / ".tmp-left-behind").mkdir()
    (cache_dir / "preprocessed" / ".tmp-left-behind" / "image.npy").write_bytes(b"x" * 10)
    (cache_dir / "preprocessed" / "old-format-1-entry.npz").write_bytes(b"y" * 10)
    (cache_dir / "notes.txt").write_text("not the cache's")
    size = sum(p.stat().st_size for p in (cache_dir / "preprocessed").rglob("*") if p.is_file())

    assert main(["cache", "info", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out == f"{cache_dir}: 3 entries, {size / 2**20:.1f} MiB\n"
    assert main(["cache", "clear", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"removed 3 entries ({size / 2**20:.1f} MiB) from {cache_dir}")
    assert not list((cache_dir / "preprocessed").iterdir()) and (cache_dir / "notes.txt").exists()
    assert main(["cache", "info", "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out == f"{cache_dir}: 0 entries, 0.0 MiB\n"
    load_case(open_dataset(root, ABDOMEN5).cases[0], ABDOMEN5, CFG, cache_dir)  # recomputed after a clear
    assert len(preprocess_calls) == 3
