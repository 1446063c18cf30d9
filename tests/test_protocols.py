"""The bench's held-out protocols (evaluation.protocols): deterministic picks, learnable tasks only."""

from __future__ import annotations

import pytest

from evaluation.protocols import families_split, variants_split

FAMILIES = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B", "b2": "B", "b3": "B", "c1": "C", "c2": "C"}


def test_variants_without_learnable_hold_out_the_middle_member_of_each_family():
    split = variants_split(FAMILIES, 2)
    assert split.held_out == ("a3", "b2")  # families with 3+ members only; C has 2
    assert set(split.training) == set(FAMILIES) - {"a3", "b2"}


def test_variants_hold_out_only_learnable_members_and_skip_families_without_one():
    split = variants_split(FAMILIES, 2, learnable={"a1", "a4", "c1"})
    assert split.held_out == ("a4",)  # B has no learnable member, C too few members; A's learnable: a1, a4
    assert "b2" in split.training and "a1" in split.training
    with pytest.raises(ValueError, match="learnable"):
        variants_split(FAMILIES, 2, learnable={"c1"})


def test_families_evaluate_learnable_members_and_prefer_families_that_have_them():
    split = families_split(FAMILIES, 1, members_per_family=2, learnable={"b1", "b3", "a2"})
    assert split.held_out_families in (("A",), ("B",))
    held_family = split.held_out_families[0]
    assert set(split.held_out) == ({"a2"} if held_family == "A" else {"b1", "b3"})
    assert not {t for t in split.training if FAMILIES[t] == held_family}
    only_c = families_split(FAMILIES, 1, learnable={"c2"})
    assert only_c.held_out_families == ("C",) and only_c.held_out == ("c2",)


def test_zoo_report_always_evaluates_the_final_checkpoint():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from zoo_report import evaluated_checkpoints

    assert evaluated_checkpoints(3, 1) == [2]  # one: the final (it was the first kept one)
    assert evaluated_checkpoints(3, 3) == [0, 1, 2]
    assert evaluated_checkpoints(10, 3) == [0, 4, 9]
    assert evaluated_checkpoints(1, 3) == [0]
