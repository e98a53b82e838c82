"""Dataset adapters: nnU-Net v2 raw folders, TotalSegmentator subject folders, AMOS 2022 and DICOM
sites (one series folder per case, labels as DICOM SEG or NIfTI).

Each adapter turns a folder into a :class:`Dataset` of :class:`CaseRef` s. A case knows its
modality, its files, how its source labels map to the label scheme (one declared table per source,
see :mod:`fedgin.data.labels`) and which scheme organs it annotates (partial labels).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, FedginError
from .labels import (
    AMOS_FIRST_MRI_ID,
    AMOS_LABELS,
    FINE_ORGANS,
    TOTALSEGMENTATOR_MASKS,
    LabelScheme,
    fines_of_label,
    normalise_label_map,
)
from .nifti import read_volume
from .volumes import check_same_grid, image_grid, is_seg_path, map_label_ids, read_image, read_raw_label

MODALITY_NAMES: dict[str, str] = {
    "ct": "CT",
    "mri": "MRI",
    "mr": "MRI",
    "t1": "MRI",
    "t2": "MRI",
    "t1w": "MRI",
    "t2w": "MRI",
}


def normalise_modality(name: str, *, where: str | Path | None = None) -> str:
    """``"CT"`` or ``"MRI"`` for a channel name such as ``CT``, ``MR``, ``T2``."""
    key = str(name).strip().lower()
    if key not in MODALITY_NAMES:
        raise DataError(where, f"unknown modality {name!r}; expected CT, or MRI/MR/T1/T2")
    return MODALITY_NAMES[key]


@dataclass(frozen=True)
class CaseRef:
    """One labelled (or unlabelled) volume of a dataset, not yet read.

    ``lut`` maps a source label id to a scheme class id (nnU-Net, AMOS); ``masks`` maps a mask file
    to a scheme class id (TotalSegmentator). ``annotated`` are the scheme organs whose absence in
    the label means background; the other organs are unknown in this case. ``annotated_fine`` are
    the fine organs the source delineates (``abdomen5``'s ``kidneys`` is unknown when only one
    kidney is, yet that kidney's voxels are expected in the label); None: same as ``annotated``.
    """

    case_id: str
    dataset: str
    modality: str
    image: Path
    label: Path | None = None
    lut: tuple[int, ...] | None = None
    masks: tuple[tuple[Path, int], ...] = ()
    annotated: tuple[str, ...] = ()
    source: str = "nnunet"
    annotated_fine: tuple[str, ...] | None = None

    def read(self, scheme: LabelScheme) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Image (float32), label in scheme ids (uint8, or None) and the image affine."""
        image, affine = read_image(self.image)
        return image, self._read_label(image.shape, affine), affine

    def read_label(self) -> tuple[np.ndarray | None, np.ndarray]:
        """The label in scheme ids (uint8, or None) and the image affine, without reading the image's
        voxels (its header gives the grid the label must share)."""
        shape, affine = image_grid(self.image)
        return self._read_label(shape, affine), affine

    def _read_label(self, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray | None:
        if self.label is not None:
            raw = read_raw_label(self.label, shape, affine)
            return map_label_ids(raw, self.lut, self.label)
        if not self.masks:
            return None
        label = np.zeros(shape, dtype=np.uint8)
        for mask_path, class_id in self.masks:
            mask, mask_affine = read_volume(mask_path, kind="label")
            check_same_grid(mask_path, shape, affine, mask.shape, mask_affine)
            if mask.max() > 1:
                raise DataError(mask_path, f"binary mask expected, found value {int(mask.max())}")
            label[mask > 0] = class_id
        return label


@dataclass
class Dataset:
    """A folder of cases from one source and one modality.

    ``label_names`` are the source's structure names that a label map can match: ``dataset.json``
    labels (nnU-Net), mask file names without ``.nii.gz`` (TotalSegmentator, listed only when a
    label map is given); none for AMOS, whose ids keep fedgin's declared table.
    """

    name: str
    root: Path
    modality: str
    source: str
    cases: list[CaseRef] = field(default_factory=list)
    test_cases: list[CaseRef] = field(default_factory=list)
    label_names: tuple[str, ...] = ()

    def case(self, case_id: str) -> CaseRef:
        for c in self.cases + self.test_cases:
            if c.case_id == case_id:
                return c
        raise KeyError(case_id)


# --- nnU-Net v2 raw -------------------------------------------------------------------------

REQUIRED_DATASET_KEYS = ("channel_names", "labels", "file_ending")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object")
    return data


def scheme_lut(labels: dict, scheme: LabelScheme, where: Path,
               label_map: Mapping[str, str] | None = None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """LUT source id -> scheme id (-1 for undeclared ids) and the fine organs the labels cover.

    ``labels`` is ``{name: id}`` as in ``dataset.json``; ``label_map`` (normalised, see
    :func:`~fedgin.data.labels.normalise_label_map`) overrides the alias table for its names."""
    ids: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(where, f"region-based label {name!r} is not supported")
        try:
            source_id = int(value)
        except (TypeError, ValueError):
            raise DataError(where, f"label {name!r} has non-integer id {value!r}") from None
        if source_id < 0:  # would index the LUT from its end
            raise DataError(where, f"label {name!r} has negative id {source_id}")
        if source_id in ids:
            raise DataError(where, f"labels {ids[source_id]!r} and {name!r} share id {source_id}")
        ids[source_id] = str(name)
    if ids.get(0, "").lower() != "background":
        raise DataError(where, "labels must map 'background' to 0")
    lut = [-1] * (max(ids) + 1)
    lut[0] = 0
    covered: set[str] = set()
    for source_id, name in ids.items():
        if source_id == 0:
            continue
        fines = _fines_in_scheme(name, f"label {name!r} (id {source_id})", scheme, where, label_map)
        covered.update(fines)
        lut[source_id] = scheme.id_of_fine(fines[0]) if fines else 0
    return tuple(lut), tuple(f for f in FINE_ORGANS if f in covered)


def _fines_in_scheme(name: str, what: str, scheme: LabelScheme, where: Path,
                     label_map: Mapping[str, str] | None) -> tuple[str, ...]:
    """The fine organs of source structure ``name`` (``()``: background), all in one scheme class."""
    try:
        fines = fines_of_label(name, label_map)
    except KeyError:
        raise DataError(where, f"{what} has no mapping to scheme {scheme.name} "
                               f"(--label-map {name}=ORGAN|background maps it)") from None
    classes = {scheme.class_of_fine(f) for f in fines}
    if len(classes) > 1:  # e.g. one "kidneys" label cannot be split into abdomen6's two kidneys
        raise DataError(where, f"{what} merges {', '.join(sorted(classes))}, which scheme {scheme.name} keeps apart")
    return fines


def _manifest_annotations(root: Path) -> dict[str, list[str]]:
    path = root / "manifest.json"
    if not path.exists():
        return {}
    manifest = _read_json(path)
    out: dict[str, list[str]] = {}
    for entry in manifest.get("cases", []):
        if not isinstance(entry, dict) or "case" not in entry:
            raise DataError(path, "each cases[] entry needs a 'case' key")
        if "annotated" in entry:
            if not isinstance(entry["annotated"], list):
                raise DataError(path, f"cases[{entry['case']}].annotated must be a list")
            out[str(entry["case"])] = [str(x) for x in entry["annotated"]]
    return out


def _annotated(scheme: LabelScheme, covered: tuple[str, ...], manifest: list[str] | None,
               where: Path, label_map: Mapping[str, str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Annotated scheme organs and annotated fine organs of one case (``covered``: the fine organs
    its labels hold; ``manifest``: the structure names it lists as annotated, if any)."""
    declared = set(covered)
    if manifest is not None:
        try:
            declared &= {f for name in manifest for f in fines_of_label(name, label_map)}
        except KeyError as exc:
            raise DataError(where, f"annotated organ {exc.args[0]!r} is unknown") from None
    fines = tuple(f for f in FINE_ORGANS if f in declared)
    return scheme.classes_of_names(fines), fines


def read_nnunet(root: Path, scheme: LabelScheme, label_map: Mapping[str, str] | None = None) -> Dataset:
    """An nnU-Net v2 raw folder: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, optional ``imagesTs/``.

    ``label_map`` (normalised) maps ``dataset.json`` label names (and manifest names) first."""
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path)
    missing = [k for k in REQUIRED_DATASET_KEYS if k not in meta]
    if missing:
        raise DataError(meta_path, f"missing key(s): {', '.join(missing)}")
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or "0" not in channels:
        raise DataError(meta_path, "channel_names must have a '0' entry")
    if len(channels) != 1:
        raise DataError(meta_path, f"{len(channels)} input channels; fedgin takes one")
    modality = normalise_modality(channels["0"], where=meta_path)
    if not isinstance(meta["labels"], dict):
        raise DataError(meta_path, "labels must be an object of name -> id")
    lut, covered = scheme_lut(meta["labels"], scheme, meta_path, label_map)
    ending = str(meta["file_ending"])
    annotations = _manifest_annotations(root)
    dataset = Dataset(name=root.name, root=root, modality=modality, source="nnunet",
                      label_names=tuple(str(n) for n in meta["labels"] if str(n).lower() != "background"))
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise DataError(images_dir, "folder not found")
    def case_ref(image: Path, labels_dir: str, *, required: bool) -> CaseRef:
        case_id = image.name[: -len(f"_0000{ending}")]
        label = root / labels_dir / f"{case_id}{ending}"
        if required and not label.exists():
            raise DataError(label, f"missing label for case {case_id}")
        annotated, annotated_fine = _annotated(scheme, covered, annotations.get(case_id),
                                               root / "manifest.json", label_map)
        return CaseRef(case_id=case_id, dataset=root.name, modality=modality, image=image,
                       label=label if label.exists() else None, lut=lut, annotated=annotated,
                       annotated_fine=annotated_fine)

    dataset.cases = [case_ref(p, "labelsTr", required=True) for p in sorted(images_dir.glob(f"*_0000{ending}"))]
    dataset.test_cases = [case_ref(p, "labelsTs", required=False)
                          for p in sorted((root / "imagesTs").glob(f"*_0000{ending}"))]
    if not dataset.cases:
        raise DataError(images_dir, f"no images named *_0000{ending}")
    n = meta.get("numTraining")
    try:
        n = None if n is None else int(n)
    except (TypeError, ValueError):
        raise DataError(meta_path, f"numTraining must be an integer, got {n!r}") from None
    if n is not None and n != len(dataset.cases):
        raise DataError(meta_path, f"numTraining is {n} but imagesTr holds {len(dataset.cases)} cases")
    return dataset


# --- TotalSegmentator -------------------------------------------------------------------------


def _totalseg_subjects(root: Path) -> list[Path]:
    if (root / "segmentations").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "segmentations").is_dir())


def _totalseg_masks(folder: Path, scheme: LabelScheme, label_map: Mapping[str, str] | None,
                    names: set[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(mask file, scheme id) pairs of one subject and the fine organs they delineate: fedgin's
    table, then ``label_map`` by structure name (file name without ``.nii.gz``; mapped to background:
    not read). ``names`` gathers the structure names seen (only with a label map)."""
    chosen: dict[str, tuple[str, ...]] = {name: (fine,) for name, fine in TOTALSEGMENTATOR_MASKS.items()}
    if label_map:
        for mask in sorted(folder.glob("*.nii.gz")):
            structure = mask.name[: -len(".nii.gz")]
            names.add(structure)
            if structure.strip().lower() in label_map:
                chosen[mask.name] = _fines_in_scheme(structure, f"mask {mask.name!r}", scheme, folder, label_map)
    masks, fines = [], []
    for filename, mask_fines in chosen.items():
        if mask_fines and (folder / filename).exists():
            masks.append((folder / filename, scheme.id_of_fine(mask_fines[0])))
            fines += [f for f in mask_fines if f not in fines]
    return masks, fines


def read_totalsegmentator(root: Path, scheme: LabelScheme, label_map: Mapping[str, str] | None = None) -> Dataset:
    """TotalSegmentator subject folders: ``sXXXX/ct.nii.gz`` (or ``mri.nii.gz``) and
    ``sXXXX/segmentations/<structure>.nii.gz``; a single subject folder also works."""
    subjects = _totalseg_subjects(root)
    if not subjects:
        raise DataError(root, "no TotalSegmentator subject folders (sXXXX/segmentations/)")
    cases: list[CaseRef] = []
    modalities = set()
    names: set[str] = set()
    for subject in subjects:
        images = [p for p in (subject / "ct.nii.gz", subject / "mri.nii.gz") if p.exists()]
        if len(images) != 1:
            raise DataError(subject, "expected exactly one of ct.nii.gz or mri.nii.gz")
        modality = "CT" if images[0].name.startswith("ct") else "MRI"
        modalities.add(modality)
        masks, fines = _totalseg_masks(subject / "segmentations", scheme, label_map, names)
        if not masks:
            raise DataError(subject / "segmentations", "none of the target organ masks is present")
        cases.append(
            CaseRef(
                case_id=subject.name,
                dataset=root.name,
                modality=modality,
                image=images[0],
                masks=tuple(masks),
                annotated=scheme.classes_of_names(fines),
                source="totalsegmentator",
                annotated_fine=tuple(f for f in FINE_ORGANS if f in fines),
            )
        )
    if len(modalities) != 1:
        raise DataError(root, "subjects mix CT and MRI; give each modality its own folder")
    return Dataset(name=root.name, root=root, modality=modalities.pop(), source="totalsegmentator", cases=cases,
                   label_names=tuple(sorted(names)))


# --- AMOS 2022 --------------------------------------------------------------------------------

AMOS_NAME = re.compile(r"^amos_(\d{4})\.nii\.gz$")


def read_amos(root: Path, scheme: LabelScheme, modality: str | None = None) -> Dataset:
    """AMOS 2022: ``imagesTr/amos_XXXX.nii.gz`` + ``labelsTr/amos_XXXX.nii.gz``; ids >= 500 are MRI.

    One call yields one modality: ``modality`` picks it (default: the one with more cases).
    """
    lut = [0] * (max(AMOS_LABELS) + 1)
    for source_id, fine in AMOS_LABELS.items():
        lut[source_id] = scheme.id_of_fine(fine) if fine else 0
    by_modality: dict[str, list[CaseRef]] = {"CT": [], "MRI": []}
    for split in ("Tr", "Va"):
        for image in sorted((root / f"images{split}").glob("amos_*.nii.gz")):
            match = AMOS_NAME.match(image.name)
            if not match:
                continue
            label = root / f"labels{split}" / image.name
            if not label.exists():
                continue  # AMOS ships unlabelled cases; they are not training data
            mod = "MRI" if int(match.group(1)) >= AMOS_FIRST_MRI_ID else "CT"
            by_modality[mod].append(
                CaseRef(
                    case_id=image.name[: -len(".nii.gz")],
                    dataset=root.name,
                    modality=mod,
                    image=image,
                    label=label,
                    lut=tuple(lut),
                    annotated=scheme.organs,
                    source="amos",
                    annotated_fine=FINE_ORGANS,
                )
            )
    if modality is None:
        modality = "CT" if len(by_modality["CT"]) >= len(by_modality["MRI"]) else "MRI"
    modality = normalise_modality(modality, where=root)
    if not by_modality[modality]:
        raise DataError(root, f"no labelled AMOS {modality} cases (imagesTr/amos_XXXX.nii.gz)")
    return Dataset(name=f"{root.name}-{modality}", root=root, modality=modality, source="amos",
                   cases=by_modality[modality])


# --- DICOM sites ------------------------------------------------------------------------------

DICOM_LABEL_ENDINGS = (".seg.dcm", ".dcm", ".nii.gz", ".nii")


def _dicom_label(labels_dir: Path, case_id: str) -> Path | None:
    found = [labels_dir / f"{case_id}{e}" for e in DICOM_LABEL_ENDINGS if (labels_dir / f"{case_id}{e}").is_file()]
    if len(found) > 1:
        raise DataError(labels_dir, f"case {case_id} has {len(found)} label files ({', '.join(f.name for f in found)})")
    return found[0] if found else None


def read_dicom_site(root: Path, scheme: LabelScheme, label_map: Mapping[str, str] | None = None) -> Dataset:
    """A DICOM site: ``images/{case}/`` one DICOM series folder per case (CT or MR, one modality
    per site, from the Modality tags), ``labels/{case}.seg.dcm`` (a DICOM SEG on that series; its
    segments named by SNOMED CT code or label) or ``labels/{case}.nii.gz`` (a NIfTI on the series'
    grid as fedgin reads it, with ``dataset.json`` ``labels`` saying which id is which organ), and
    an optional ``manifest.json`` (annotated organs per case, as for nnU-Net). A case without a
    label is a test case."""
    from .dicom import dicom_files, find_series
    from .dicom_seg import read_segments

    images_dir = root / "images"
    folders = sorted(p for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(images_dir, "no case folders (images/{case}/ holding one DICOM series each)")
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path) if meta_path.exists() else {}
    annotations = _manifest_annotations(root)
    nifti_lut = None
    modalities: dict[str, str] = {}
    dataset = Dataset(name=root.name, root=root, modality="", source="dicom")
    names: set[str] = set()
    for folder in folders:
        if not dicom_files(folder):
            raise DataError(folder, "no DICOM files in this case folder")
        found = find_series(folder)
        if len(found) > 1:
            raise DataError(folder, f"{len(found)} series in one case folder: a DICOM site holds one series per case")
        series = found[0][1]
        modalities[folder.name] = series.modality
        label = _dicom_label(root / "labels", folder.name)
        lut, covered = None, ()
        if label is not None and is_seg_path(label):
            segments = read_segments(label)
            names.update(n for n in segments if n != "background")
            lut, covered = scheme_lut(segments, scheme, label, label_map)
        elif label is not None:
            if nifti_lut is None:
                if not isinstance(meta.get("labels"), dict):
                    raise DataError(meta_path, "NIfTI labels need dataset.json with labels {name: id}")
                nifti_lut = scheme_lut(meta["labels"], scheme, meta_path, label_map)
                names.update(str(n) for n in meta["labels"] if str(n).lower() != "background")
            lut, covered = nifti_lut
        annotated, annotated_fine = _annotated(scheme, covered, annotations.get(folder.name),
                                               root / "manifest.json", label_map)
        ref = CaseRef(case_id=folder.name, dataset=root.name, modality=series.modality, image=folder,
                      label=label, lut=lut, annotated=annotated if label is not None else (), source="dicom",
                      annotated_fine=annotated_fine if label is not None else ())
        (dataset.cases if label is not None else dataset.test_cases).append(ref)
    if len(set(modalities.values())) > 1:
        raise DataError(root, "cases mix CT and MR series; give each modality its own site")
    dataset.modality = next(iter(modalities.values()))
    dataset.label_names = tuple(sorted(names))
    if not dataset.cases:
        raise DataError(root / "labels", "no case has a label (labels/{case}.seg.dcm or labels/{case}.nii.gz)")
    return dataset


def _is_dicom_site(root: Path) -> bool:
    return (root / "images").is_dir() and not (root / "imagesTr").is_dir()


def _is_amos(root: Path) -> bool:
    return any(AMOS_NAME.match(p.name) for p in (root / "imagesTr").glob("amos_*.nii.gz"))


def open_dataset(path: str | Path, scheme: LabelScheme, *, modality: str | None = None,
                 label_map: Mapping[str, str] | None = None) -> Dataset:
    """Open a dataset folder of any supported layout (detected from its contents).

    ``path`` may end in ``:CT`` or ``:MRI`` to pick one modality of a mixed AMOS folder.
    ``label_map`` (``{source structure name: fine organ, alias or "background"}``, the
    ``--label-map`` option) overrides the alias table for the names it gives, matched without
    regard to case: nnU-Net ``dataset.json`` labels and TotalSegmentator mask names; AMOS ids keep
    their declared table.
    """
    label_map = normalise_label_map(label_map)
    text = str(path)
    if modality is None and re.search(r":(CT|MRI|MR)$", text, flags=re.IGNORECASE):
        text, modality = text.rsplit(":", 1)
    root = Path(text)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "expected a dataset folder")
    if (root / "imagesTr").is_dir() and _is_amos(root):
        return read_amos(root, scheme, modality)
    if _is_dicom_site(root):
        return read_dicom_site(root, scheme, label_map)
    if (root / "dataset.json").exists():
        return read_nnunet(root, scheme, label_map)
    if _totalseg_subjects(root):
        return read_totalsegmentator(root, scheme, label_map)
    raise DataError(root, "not a dataset: no dataset.json (nnU-Net), amos_XXXX files (AMOS), "
                          "sXXXX/segmentations/ folders (TotalSegmentator) or images/{case}/ DICOM series (DICOM site)")


def check_label_map_names(label_map: Mapping[str, str] | None, datasets: Iterable[Dataset],
                          more_names: Iterable[str] = ()) -> None:
    """Every name of ``label_map`` must be a label of one of ``datasets`` (or in ``more_names``):
    a name that labels nothing is a typo, refused in one line."""
    known = {str(n).strip().lower(): str(n) for d in datasets for n in d.label_names}
    known.update({str(n).strip().lower(): str(n) for n in more_names})
    for name in normalise_label_map(label_map):
        if name not in known:
            listed = sorted(known.values())
            shown = ", ".join(listed[:12]) + (", ..." if len(listed) > 12 else "")
            raise FedginError(f"--label-map {name}: no dataset has a label named {name!r} "
                              f"(labels: {shown or 'none that a label map can rename'})")
