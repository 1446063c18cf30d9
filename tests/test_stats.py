import numpy as np

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
    assert "| t1 |" in text and "**0.750**" in text
    assert paths["accuracy_plot"].stat().st_size > 1000 and paths["time_plot"].read_bytes()[:4] == b"\x89PNG"
