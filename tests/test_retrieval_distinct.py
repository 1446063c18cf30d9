"""`registry search` and `registry compose` default to distinct adapters / tasks, not checkpoints of one."""

from __future__ import annotations

import json

from conftest import make_tiny_adapter_dir

MATH = ["What is 12 plus 30?", "Add 7 and 15.", "Compute 81 minus 27.", "What is 6 times 9?"]
COOK = ["How long should I boil pasta?", "How do I bake sourdough bread?", "Give me a recipe for pancakes."]
GEO = ["What is the capital of France?", "Which river flows through Egypt?", "Name the highest mountain in Africa."]


def _zoo(reg, tiny_base_dir, tmp_path):
    """Three checkpoints of an arithmetic adapter (same prompts), one cooking and one geography adapter."""
    for version in range(3):
        reg.add_directory(make_tiny_adapter_dir(tiny_base_dir, tmp_path / f"math{version}", seed=10 + version),
                          name="math", kind="harvested", task="arithmetic", prompts=MATH)
    reg.add_directory(make_tiny_adapter_dir(tiny_base_dir, tmp_path / "cook", seed=2), name="cook", kind="harvested",
                      task="cooking", prompts=COOK)
    reg.add_directory(make_tiny_adapter_dir(tiny_base_dir, tmp_path / "geo", seed=3), name="geo", kind="harvested",
                      task="geography", prompts=GEO)


def test_search_lists_one_version_per_adapter_unless_all_versions(cli, reg, tiny_base_dir, tmp_path):
    _zoo(reg, tiny_base_dir, tmp_path)
    code, out, err = cli("search", "What is 5 plus 8?", "-k", "3", "--json")
    assert code == 0, err
    refs = [hit["ref"] for hit in json.loads(out)]
    assert refs[0] == "math@3" and len({r.split("@")[0] for r in refs}) == 3  # the newest checkpoint, then others
    code, out, err = cli("search", "What is 5 plus 8?", "-k", "3", "--all-versions", "--json")
    assert code == 0, err
    assert [hit["ref"] for hit in json.loads(out)] == ["math@3", "math@2", "math@1"]


def test_compose_mixes_distinct_tasks_by_default(cli, reg, tiny_base_dir, tmp_path):
    _zoo(reg, tiny_base_dir, tmp_path)
    query = tmp_path / "q.txt"
    query.write_text("What is 5 plus 8?\nCompute 9 times 7.\n")
    code, out, err = cli("compose", "--prompts", query, "-k", "3", "--strategy", "mixture", "--name", "mix", "--json")
    assert code == 0, err
    parents = [p["ref"] for p in json.loads(out)["parents"]]
    assert parents[0] == "math@3" and sorted(p.split("@")[0] for p in parents) == ["cook", "geo", "math"]
    code, out, err = cli("compose", "--prompts", query, "-k", "3", "--strategy", "mixture", "--name", "mix2",
                         "--all-versions", "--json")
    assert code == 0, err
    assert [p["ref"] for p in json.loads(out)["parents"]] == ["math@3", "math@2", "math@1"]
