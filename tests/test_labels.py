"""Label schemes and source tables: the ids a user sees in ``labels.json`` and predictions."""

from __future__ import annotations

import pytest

from fedgin.data.labels import (
    AMOS_FIRST_MRI_ID,
    AMOS_LABELS,
    FINE_ORGANS,
    SCHEMES,
    TOTALSEGMENTATOR_MASKS,
    expand_fine,
    get_scheme,
)
from fedgin.errors import FedginError


def test_abdomen5_is_the_papers_five_organs_with_merged_kidneys():
    scheme = get_scheme("abdomen5")
    assert scheme.label_ids == {"background": 0, "liver": 1, "kidneys": 2, "spleen": 3, "pancreas": 4,
                                "gallbladder": 5}
    assert scheme.num_classes == 6
    assert scheme.to_dict() == {"name": "abdomen5",
                                "organs": ["liver", "kidneys", "spleen", "pancreas", "gallbladder"],
                                "labels": scheme.label_ids}


def test_abdomen6_keeps_the_kidneys_apart():
    scheme = get_scheme("abdomen6")
    assert scheme.label_ids == {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4,
                                "pancreas": 5, "gallbladder": 6}
    assert scheme.num_classes == 7


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_fine_organ_belongs_to_exactly_one_class(name):
    scheme = SCHEMES[name]
    members = [f for _, fines in scheme.members for f in fines]
    assert sorted(members) == sorted(FINE_ORGANS)
    assert [o for o, _ in scheme.members] == list(scheme.organs)


@pytest.mark.parametrize(
    ("fine", "abdomen5", "abdomen6"),
    [("liver", 1, 1), ("kidney_right", 2, 2), ("kidney_left", 2, 3), ("spleen", 3, 4), ("pancreas", 4, 5),
     ("gallbladder", 5, 6)],
)
def test_fine_organ_ids(fine, abdomen5, abdomen6):
    assert get_scheme("abdomen5").id_of_fine(fine) == abdomen5
    assert get_scheme("abdomen6").id_of_fine(fine) == abdomen6


@pytest.mark.parametrize(
    ("spelling", "fines"),
    [
        ("liver", ("liver",)),
        ("Liver", ("liver",)),
        ("right_kidney", ("kidney_right",)),
        ("kidney_R", ("kidney_right",)),
        ("RK", ("kidney_right",)),
        ("left_kidney", ("kidney_left",)),
        ("lk", ("kidney_left",)),
        ("gall_bladder", ("gallbladder",)),
        ("Gall Bladder", ("gallbladder",)),
        (" gallbladder ", ("gallbladder",)),
        ("kidneys", ("kidney_right", "kidney_left")),
        ("kidney", ("kidney_right", "kidney_left")),
        ("stomach", ()),
        ("inferior_vena_cava", ()),
        ("prostate/uterus", ()),
    ],
)
def test_source_spellings_map_to_fine_organs(spelling, fines):
    assert expand_fine(spelling) == fines


@pytest.mark.parametrize("spelling", ["tumour", "liver tumor", "kidney cyst", ""])
def test_unknown_structure_is_refused(spelling):
    with pytest.raises(KeyError):
        expand_fine(spelling)


@pytest.mark.parametrize(
    ("names", "abdomen5", "abdomen6"),
    [
        # CHAOS MR: four organs
        (["liver", "kidney_right", "kidney_left", "spleen"], ("liver", "kidneys", "spleen"),
         ("liver", "kidney_right", "kidney_left", "spleen")),
        # one kidney only: abdomen5's merged class is not fully annotated
        (["liver", "right_kidney"], ("liver",), ("liver", "kidney_right")),
        (["kidneys", "stomach"], ("kidneys",), ("kidney_right", "kidney_left")),
        (["gall_bladder", "pancreas"], ("pancreas", "gallbladder"), ("pancreas", "gallbladder")),
        ([], (), ()),
    ],
)
def test_classes_annotated_by_structure_names(names, abdomen5, abdomen6):
    assert get_scheme("abdomen5").classes_of_names(names) == abdomen5
    assert get_scheme("abdomen6").classes_of_names(names) == abdomen6


def test_unknown_scheme_is_a_usage_error_naming_the_known_ones():
    with pytest.raises(FedginError, match=r"^unknown label scheme 'abdomen7'; known: abdomen5, abdomen6$"):
        get_scheme("abdomen7")


def test_amos_table_matches_the_amos_2022_label_ids():
    named = {i: f for i, f in AMOS_LABELS.items() if f is not None}
    assert named == {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 6: "liver",
                     10: "pancreas"}
    assert sorted(AMOS_LABELS) == list(range(16))
    assert AMOS_FIRST_MRI_ID == 500


def test_totalsegmentator_table_has_one_mask_per_fine_organ():
    assert sorted(TOTALSEGMENTATOR_MASKS.values()) == sorted(FINE_ORGANS)
    assert all(name == f"{fine}.nii.gz" for name, fine in TOTALSEGMENTATOR_MASKS.items())
