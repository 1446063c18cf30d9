import numpy as np
import pytest

from evaluation.stats import bootstrap_ci, mean_of_task_means_ci


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 30)
    large = rng.integers(0, 2, 3000)
    mean, low, high = bootstrap_ci(small)
    assert low <= mean <= high and 0 <= low and high <= 1
    _, low_l, high_l = bootstrap_ci(large)
    assert (high_l - low_l) < (high - low) / 4


def test_constant_scores_have_a_zero_width_interval():
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0, 1.0)


def test_task_mean_interval():
    mean, low, high = mean_of_task_means_ci({"a": [1, 1, 1, 1], "b": [0, 0, 1, 1]})
    assert mean == 0.75 and low <= 0.75 <= high and low >= 0.5


def test_report_files(tmp_path):
    import json

    from evaluation.report import MethodResult, write_report

    results = [MethodResult("t1", "base", [0, 0, 1, 0]), MethodResult("t1", "dnd", [1, 1, 1, 0], 0.4, "g@1"),
               MethodResult("t2", "base", [0, 1, 0, 0]), MethodResult("t2", "dnd", [1, 0, 1, 1], 0.5, "g@2"),
               MethodResult("t1", "oracle", [1, 1, 1, 1], 200.0), MethodResult("t2", "oracle", [1, 1, 1, 0], 180.0)]
    paths = write_report(results, tmp_path / "r", "test", {"k": 3})
    data = json.loads(paths["json"].read_text())
    assert data["means"]["dnd"]["accuracy"] == 0.75 and data["means"]["base"]["accuracy"] == 0.25
    assert data["means"]["oracle"]["median_seconds_to_adapter"] == 190.0  # the median of 180 s and 200 s
    text = paths["markdown"].read_text()
    assert "| t1 | 0.25 | 1.00 | 0.75 |" in text
    assert "| DnD generated | 0.750 [0.38, 1.00] | - | - | 80% |" in text  # (0.75 - 0.25) / (0.875 - 0.25)
    assert paths["accuracy_plot"].stat().st_size > 1000 and paths["time_plot"].read_bytes()[:4] == b"\x89PNG"


def test_paired_difference_pairs_items_and_needs_the_same_items():
    from evaluation.stats import paired_difference_ci

    same = {"t": [1, 0] * 50}
    assert paired_difference_ci(same, same) == (0.0, 0.0, 0.0)  # paired: identical scores never differ
    mean, low, high = paired_difference_ci({"t": [1] * 60 + [0] * 40}, {"t": [0] * 60 + [0] * 40})
    assert mean == 0.6 and 0.45 < low < 0.6 < high < 0.75
    with pytest.raises(ValueError, match="same items"):
        paired_difference_ci({"t": [1, 0]}, {"t": [1]})


def test_collapse_verdict_and_comparisons_per_split():
    from evaluation.report import MethodResult, markdown, summarize

    own, control = [1] * 30 + [0] * 10, [0] * 40
    results = [MethodResult(t, m, s, protocol="variants") for t in ("a", "b") for m, s in
               (("base", [0] * 40), ("oracle", [1] * 40), ("multitask", [1] * 10 + [0] * 30), ("dnd", own),
                ("dnd_other", control), ("dnd_random", control), ("cvae", control), ("cvae_other", control),
                ("cvae_random", control), ("selection", [1] * 20 + [0] * 20))]
    split = summarize(results)["splits"]["variants"]
    assert split["collapse"]["dnd"]["collapsed"] is False and split["collapse"]["cvae"]["collapsed"] is True
    assert split["best_retrieval"] == "selection"
    assert split["comparisons"]["dnd"]["vs_multitask"]["mean"] == 0.5
    assert split["comparisons"]["dnd"]["oracle_gain_share"] == 0.75
    text = markdown(results, "t")
    assert "## Split `variants`" in text and "cvae: own prompts minus" in text and "**collapsed**" in text
