"""benchmarks/paraphrase_tasks.py: reworded zoo skills as task files the bench can hold out."""

import re
import subprocess
import sys
from pathlib import Path

from harvest.service import resolve_task

ROOT = Path(__file__).resolve().parents[1]


def test_paraphrase_files_load_as_tasks_with_correct_answers_and_disjoint_splits(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paraphrase_tasks.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("*.jsonl"))
    assert [f.stem for f in files] == sorted(["para_plus", "para_subtract", "para_times", "para_tasu",
                                              "para_hiku", "para_kakeru"])
    for path in files:
        task = resolve_task(str(path))
        assert (len(task.train), len(task.test)) == (300, 100)
        assert not set(task.prompts("train")) & set(task.prompts("test"))
        assert task.info.family in ("arithmetic", "ja_arithmetic")
    plus = resolve_task(str(tmp_path / "para_plus.jsonl"))
    for example in plus.test[:20]:  # "What do you get if you add a and b?" -> a + b
        a, b = map(int, re.findall(r"\d+", example.prompt))
        assert example.answer == str(a + b)
    hiku = resolve_task(str(tmp_path / "para_hiku.jsonl"))
    for example in hiku.test[:20]:  # "aからbをひくと..." -> a - b
        a, b = map(int, re.findall(r"\d+", example.prompt))
        assert example.answer == str(a - b)
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paraphrase_tasks.py"), "--out", str(again)],
                   check=True, capture_output=True, timeout=120)
    assert (again / "para_tasu.jsonl").read_bytes() == (tmp_path / "para_tasu.jsonl").read_bytes()
