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


def _draw(a_range: tuple[int, int], b_range: tuple[int, int], ordered: bool = False):
    """Operands ``a``, ``b`` from inclusive ranges (``ordered``: two distinct draws, ``a < b``)."""

    def draw(rng: random.Random) -> tuple[int, int]:
        if ordered:
            return tuple(sorted(rng.sample(range(a_range[0], a_range[1] + 1), 2)))
        return rng.randint(*a_range), rng.randint(*b_range)

    return draw


# name -> (source zoo task, family, language, prompt template, operands (the source's ranges), answer)
PARAPHRASES = {
    "para_plus": ("plus_words", "arithmetic", "en", "What do you get if you add {a} and {b}?",
                  _draw((10, 99), (10, 99)), lambda a, b: a + b),
    "para_subtract": ("subtract_from", "arithmetic", "en", "Take {a} away from {b}. What is left?",
                      _draw((10, 99), (10, 99), ordered=True), lambda a, b: b - a),
    "para_times": ("times_small", "arithmetic", "en", "How much is {b} multiplied by {a}?",
                   _draw((2, 9), (10, 99)), lambda a, b: a * b),
    "para_tasu": ("ja_tasu", "ja_arithmetic", "ja", "{a}に{b}をたすと、いくつになりますか？",
                  _draw((1, 99), (1, 9)), lambda a, b: a + b),
    "para_hiku": ("ja_hiku", "ja_arithmetic", "ja", "{a}から{b}をひくと、いくつになりますか？",
                  _draw((10, 99), (1, 9)), lambda a, b: a - b),
    "para_kakeru": ("ja_kakeru", "ja_arithmetic", "ja", "{b}に{a}をかけると、いくつですか？",
                    _draw((2, 9), (2, 99)), lambda a, b: a * b),
}


def build(name: str, seed: int = 0) -> Task:
    """The paraphrase task ``name``: N_TRAIN train and N_TEST test items with distinct prompts."""
    source, family, language, template, draw, answer = PARAPHRASES[name]
    rng = random.Random(f"{name}:{seed}")  # a str seed hashes the same in every process
    seen, examples = set(), []
    while len(examples) < N_TRAIN + N_TEST:
        a, b = draw(rng)
        prompt = template.format(a=a, b=b)
        if prompt not in seen:
            seen.add(prompt)
            examples.append(Example(prompt, str(answer(a, b))))
    description = f"{source} reworded: '{template}'."
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
