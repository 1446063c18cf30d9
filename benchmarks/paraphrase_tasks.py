"""Paraphrase tasks: zoo skills reworded, as task files, for a held-out split where transfer is possible.

    python benchmarks/paraphrase_tasks.py --out tasks/paraphrase     # writes 6 .jsonl + .meta.json pairs

Each task asks exactly what one zoo task asks (same operands, same answer format, same language),
in new wording: ``para_plus`` is ``plus_words`` ("What is 47 plus 38?") asked as "What do you get
if you add 47 and 38?". Held out with ``registry bench --held-out <the files>`` while their source
tasks train, they separate two questions the zoo's own variants mix up: does a 60-step LoRA carry
over to a rewording of its task at all (the source task's LoRA, ``best_other``), and does a
generator give the rewording its source's adapter (a generator that does not is ignoring its
condition, whatever the zoo's harder variants say). Items are drawn from ``random.Random(seed)``
with a fixed seed per task; train and test never share a prompt.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harvest.tasks import Example, Task, TaskInfo, write_task_file  # noqa: E402

N_TRAIN, N_TEST = 300, 100


def _plus(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What do you get if you add {a} and {b}?", str(a + b)


def _subtract(rng):
    a, b = sorted(rng.sample(range(10, 100), 2))
    return f"Take {a} away from {b}. What is left?", str(b - a)


def _times(rng):
    a, b = rng.randint(2, 9), rng.randint(10, 99)
    return f"How much is {b} multiplied by {a}?", str(a * b)


def _tasu(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 9)
    return f"{a}に{b}をたすと、いくつになりますか？", str(a + b)


def _hiku(rng):
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return f"{a}から{b}をひくと、いくつになりますか？", str(a - b)


def _kakeru(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 99)
    return f"{b}に{a}をかけると、いくつですか？", str(a * b)


# name -> (source zoo task, family, language, description, item)
PARAPHRASES = {
    "para_plus": ("plus_words", "arithmetic", "en", "plus_words reworded: add two two-digit numbers.", _plus),
    "para_subtract": ("subtract_from", "arithmetic", "en", "subtract_from reworded: take a smaller two-digit "
                      "number away from a larger one.", _subtract),
    "para_times": ("times_small", "arithmetic", "en", "times_small reworded: a two-digit number times a "
                   "one-digit one.", _times),
    "para_tasu": ("ja_tasu", "ja_arithmetic", "ja", "ja_tasu reworded: add a one-digit number (に…をたすと).", _tasu),
    "para_hiku": ("ja_hiku", "ja_arithmetic", "ja", "ja_hiku reworded: subtract a one-digit number (から…をひくと).",
                  _hiku),
    "para_kakeru": ("ja_kakeru", "ja_arithmetic", "ja", "ja_kakeru reworded: multiply by a one-digit number "
                    "(に…をかけると).", _kakeru),
}


def build(name: str, seed: int = 0) -> Task:
    """The paraphrase task ``name``: N_TRAIN train and N_TEST test items with distinct prompts."""
    source, family, language, description, item = PARAPHRASES[name]
    rng = random.Random(f"{name}:{seed}")  # a str seed hashes the same in every process
    seen, examples = set(), []
    while len(examples) < N_TRAIN + N_TEST:
        prompt, answer = item(rng)
        if prompt not in seen:
            seen.add(prompt)
            examples.append(Example(prompt, answer))
    info = TaskInfo(name=name, description=description, metric="numeric", n_train=N_TRAIN, n_test=N_TEST,
                    source=f"paraphrase of {source}", language=language, family=family)
    return Task(info=info, train=examples[:N_TRAIN], test=examples[N_TRAIN:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tasks/paraphrase"), help="folder for the task files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in PARAPHRASES:
        path = write_task_file(build(name, args.seed), args.out / f"{name}.jsonl")
        print(f"{path}  ({PARAPHRASES[name][0]} reworded)")


if __name__ == "__main__":
    main()
