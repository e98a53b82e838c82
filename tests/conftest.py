"""Shared fixtures: small real NIfTI datasets written to ``tmp_path``, the shared real bundle, and
an isolated preprocessing cache.

Fixtures (all function-scoped):
- ``make_nnunet(name="Dataset001_Site", **options) -> Path``: writes an nnU-Net v2 raw dataset
  (``dataset.json``, ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``, optional
  ``imagesTs/``, optional ``manifest.json``) of small phantom volumes; see :func:`write_nnunet`.
- ``phantom``: :func:`phantom_case`, image + label arrays with one box per organ.
- ``shared_data``: ``../shared/data/abdomen-ct-mr`` beside the checkout, or the test is skipped.
- ``phantom_datasets(n_ct, n_mri, seed=0, mri_partial=False) -> (ct, mri)`` (session-scoped): the
  generator's CT and MRI datasets, written once per session (per xdist worker) for each argument
  set and shared by every module that asks for it. Read only: a test that damages a file copies
  the datasets into its own ``tmp_path`` first (:func:`copy_sites`).
- ``server_task_identity``: the task identity Flower's ServerApp runtime sets, for tests that build
  the server's messages (with ``server_side.FakeGrid``).
- ``FEDGIN_COMPILE=0`` for the whole session and every process it starts: hundreds of short runs
  in many shapes would each pay a compilation. ``tests/test_compile.py`` turns it back on
  (``compiled_training``: inductor's cache in one folder shared by the session's workers).
- ``FEDGIN_CACHE_DIR`` points at a fresh temporary folder in every test (autouse), so no test reads
  or writes ``~/.cache/fedgin``.
- torch's process-wide state (thread count, deterministic algorithms), which ``--threads``, the
  trainer's seeding and the ClientApp set, is restored after every test and after every module
  (autouse; the module level covers module-scoped fixtures that train).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgin.data.nifti import write_volume
from fedgin.engine.compiled import COMPILE_ENV, INDUCTOR_CACHE_ENV
from fedgin.synthetic import PHANTOM_LABELS, write_phantom_datasets

os.environ[COMPILE_ENV] = "0"  # see the module docstring; set before any test or child process starts

#: The label map of the shared bundle and of most fixtures (the phantoms use the same table).
ABDOMEN_LABELS: dict[str, int] = dict(PHANTOM_LABELS)

#: Default volume: 24 x 20 voxels in-plane, 6 slices.
SHAPE: tuple[int, int, int] = (24, 20, 6)

#: Voxel boxes (x0, x1, y0, y1, z0, z1) per fine organ, non-overlapping and inside ``SHAPE``.
ORGAN_BOXES: dict[str, tuple[int, int, int, int, int, int]] = {
    "liver": (2, 10, 2, 10, 1, 5),
    "kidney_right": (2, 6, 12, 17, 1, 4),
    "kidney_left": (18, 22, 12, 17, 1, 4),
    "spleen": (16, 22, 2, 8, 2, 5),
    "pancreas": (9, 16, 11, 13, 2, 4),
    "gallbladder": (11, 14, 4, 7, 2, 3),
    "stomach": (11, 16, 15, 19, 0, 2),  # a structure sources label but no scheme segments
}

#: Mean intensity per organ: CT in HU, MRI in arbitrary units.
_CT_VALUES = {"background": -80.0, "liver": 60.0, "kidney_right": 150.0, "kidney_left": 150.0,
              "spleen": 45.0, "pancreas": 35.0, "gallbladder": 10.0, "stomach": 20.0}
_MRI_VALUES = {"background": 40.0, "liver": 300.0, "kidney_right": 650.0, "kidney_left": 650.0,
               "spleen": 500.0, "pancreas": 350.0, "gallbladder": 800.0, "stomach": 200.0}

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abdomen-ct-mr"


def phantom_case(
    shape: tuple[int, int, int] = SHAPE,
    *,
    modality: str = "CT",
    organs: Mapping[str, int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An int16 image and a uint8 label of ``shape``: one box per organ in ``organs``.

    ``organs`` maps a box name of :data:`ORGAN_BOXES` to the label value painted there (default:
    the six organs with their :data:`ABDOMEN_LABELS` ids). Boxes are clipped to ``shape``; with
    ``organs`` holding scheme ids the label is the expected result of mapping a source label.
    """
    if organs is None:
        organs = {o: i for o, i in ABDOMEN_LABELS.items() if o in ORGAN_BOXES}
    values = _CT_VALUES if modality == "CT" else _MRI_VALUES
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, values["background"], dtype=np.float64)
    for box_name, value in organs.items():
        x0, x1, y0, y1, z0, z1 = ORGAN_BOXES[box_name]
        region = (slice(x0, x1), slice(y0, y1), slice(z0, z1))
        label[region] = value
        image[region] = values.get(box_name, 100.0)
    image += rng.normal(0.0, 8.0, size=shape)
    if modality != "CT":
        image = np.clip(image, 0, None)
    return np.round(image).astype(np.int16), label


def write_nnunet(
    root: Path,
    cases: Iterable[str] | Mapping[str, Mapping[str, int] | None] = ("case_000", "case_001"),
    *,
    labels: Mapping[str, int] = ABDOMEN_LABELS,
    modality: str = "CT",
    affine: np.ndarray | None = None,
    shape: tuple[int, int, int] = SHAPE,
    manifest: Mapping[str, list[str]] | None = None,
    test_cases: Iterable[str] = (),
    num_training: int | None | str = "auto",
) -> Path:
    """Write an nnU-Net v2 raw dataset exactly as nnU-Net lays it out; return ``root``.

    ``cases`` names the training cases, or maps each to the ``organs`` painted in its label
    (box name -> label value; ``None``: every organ of ``labels`` that has a box). ``manifest``
    (case -> annotated structure names) writes ``manifest.json`` next to ``dataset.json``.
    ``num_training="auto"`` writes the true count, ``None`` leaves the key out.
    """
    root = Path(root)
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else np.asarray(affine, dtype=float)
    if not isinstance(cases, Mapping):
        cases = {c: None for c in cases}
    default_organs = {name: i for name, i in labels.items() if name in ORGAN_BOXES}
    for n, (case, organs) in enumerate(cases.items()):
        image, label = phantom_case(shape, modality=modality, seed=n,
                                    organs=default_organs if organs is None else organs)
        write_volume(root / "imagesTr" / f"{case}_0000.nii.gz", image, affine)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", label, affine)
    for n, case in enumerate(test_cases):
        image, _ = phantom_case(shape, modality=modality, seed=100 + n, organs=default_organs)
        write_volume(root / "imagesTs" / f"{case}_0000.nii.gz", image, affine)
    meta = {
        "name": root.name,
        "channel_names": {"0": modality},
        "labels": dict(labels),
        "file_ending": ".nii.gz",
    }
    if num_training is not None:
        meta["numTraining"] = len(cases) if num_training == "auto" else num_training
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    if manifest is not None:
        entries = [{"case": case, "annotated": list(names)} for case, names in manifest.items()]
        (root / "manifest.json").write_text(json.dumps({"cases": entries}, indent=2))
    return root


@pytest.fixture
def phantom() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """:func:`phantom_case`."""
    return phantom_case


@pytest.fixture
def make_nnunet(tmp_path: Path) -> Callable[..., Path]:
    """``make_nnunet(name="Dataset001_Site", **options)``: :func:`write_nnunet` under ``tmp_path``."""

    def make(name: str = "Dataset001_Site", **options) -> Path:
        return write_nnunet(tmp_path / name, **options)

    return make


@pytest.fixture
def shared_data() -> Path:
    """The shared real bundle (two nnU-Net datasets, 23 cases); skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data bundle not found at {SHARED_DATA}; it sits beside the checkout in CI")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_datasets(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """``phantom_datasets(n_ct, n_mri, seed=0, mri_partial=False) -> (ct, mri)``: phantom datasets
    written once per session for each argument set (read only; see :func:`copy_sites`)."""
    written: dict[tuple, tuple[Path, Path]] = {}

    def get(n_ct: int, n_mri: int, seed: int = 0, mri_partial: bool = False) -> tuple[Path, Path]:
        key = (n_ct, n_mri, seed, mri_partial)
        if key not in written:
            root = tmp_path_factory.mktemp(f"phantoms-{n_ct}ct-{n_mri}mri-seed{seed}{'-partial' * mri_partial}")
            ct, mri = write_phantom_datasets(root, n_ct=n_ct, n_mri=n_mri, seed=seed, mri_partial=mri_partial)
            written[key] = (Path(ct), Path(mri))
        return written[key]

    return get


@contextlib.contextmanager
def benchmark_module(script: str) -> Iterator:
    """``benchmarks/<script>.py`` imported as a module for the length of the ``with`` (registered in
    ``sys.modules`` meanwhile: a dataclass looks its module up while being defined)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def copy_sites(sites: Iterable[Path], dest: Path) -> list[Path]:
    """Copies of shared phantom datasets under ``dest``, for a test that changes their files."""
    return [Path(shutil.copytree(site, dest / site.name)) for site in sites]


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower 1.42 stamps instruction messages with the identity of the process's task, which the
    ServerApp runtime sets; tests that build the server's messages set it the same way."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty ``FEDGIN_CACHE_DIR``; ``~/.cache`` is never touched."""
    cache = tmp_path_factory.mktemp("fedgin-cache")
    monkeypatch.setenv("FEDGIN_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def compiled_training(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Compilation back on (``FEDGIN_COMPILE=1``) with inductor's cache in one folder for the whole
    session, shared by its xdist workers (the parent of their base temp folders), so a graph is
    compiled once per session; returns that folder."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "inductor-cache"
    shared.mkdir(exist_ok=True)
    monkeypatch.setenv(COMPILE_ENV, "1")
    monkeypatch.setenv(INDUCTOR_CACHE_ENV, str(shared))
    return shared


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs 2 workers) each worker gets its share of the cores
    as torch threads, so two workers training at once do not oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


#: Test files whose slow tests are scheduled one by one (``make test``), longest file first: they
#: hold function-scoped fixtures only and spend much of their time waiting on Flower's processes.
SPREAD_MODULES = ("test_learning.py", "test_faults.py", "test_federated.py", "test_determinism.py",
                  "test_robust_aggregation.py", "test_differential_privacy.py", "test_secure_aggregation.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order and grouping ``make test`` schedules by (``--dist loadgroup
    --no-loadscope-reorder``): the slow tests of ``SPREAD_MODULES`` first, each on its own, so the
    longest start at once and the short ones fill the gaps (longest processing time first); every
    other test keeps its module's group, so module-scoped fixtures are built once. Without xdist,
    only the order changes."""
    def spread(item: pytest.Item) -> bool:
        return item.path.name in SPREAD_MODULES and item.get_closest_marker("slow") is not None

    for item in items:
        if not spread(item):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=lambda item: SPREAD_MODULES.index(item.path.name) if spread(item) else len(SPREAD_MODULES))


def _torch_state() -> tuple[int, bool, bool]:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


def _set_torch_state(state: tuple[int, bool, bool]) -> None:
    threads, deterministic, warn_only = state
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_state_per_module():
    """Module-scoped fixtures that train change torch's process-wide state; the next module gets
    its own back."""
    state = _torch_state()
    yield
    _set_torch_state(state)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """A test that trains (``--threads``, seeding) leaves the next test the state it found."""
    state = _torch_state()
    yield
    _set_torch_state(state)
