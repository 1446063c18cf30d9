"""Family ``sequences``: continue or complete a number, letter or word pattern."""

from __future__ import annotations

from harvest.zoo._spec import COLORS, WORDS, family, procedural, rg

add = family("sequences", "Continue or complete a pattern of numbers, letters or words.")

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _join(values) -> str:
    return ", ".join(map(str, values))


def _arithmetic(rng):
    start, step = rng.randint(1, 50), rng.randint(2, 12)
    terms = [start + i * step for i in range(5)]
    return f"What comes next: {_join(terms[:4])}, ?", str(terms[4])


def _geometric(rng):
    start, ratio, shown = rng.randint(1, 150), rng.choice((2, 3)), rng.randint(3, 4)
    terms = [start * ratio**i for i in range(shown + 1)]
    return f"What comes next in the sequence {_join(terms[:shown])}?", str(terms[shown])


def _countdown(rng):
    start, step = rng.randint(40, 120), rng.randint(2, 9)
    terms = [start - i * step for i in range(5)]
    return f"Continue the pattern: {_join(terms[:4])}, ...", str(terms[4])


def _next_letters(rng):
    letters = [rng.choice(_LETTERS[:-1]) for _ in range(3)]
    return (f"Write the letter right after each of these in the alphabet: {_join(letters)}",
            _join(_LETTERS[_LETTERS.index(c) + 1] for c in letters))


def _shift_letters(rng):
    words = [rng.choice([w for w in WORDS if "z" not in w and len(w) <= 5]) for _ in range(2)]
    return (f"Replace each letter with the one after it in the alphabet: {' '.join(words)}",
            " ".join("".join(_LETTERS[_LETTERS.index(c) + 1] for c in w) for w in words))


def _repeat_pattern(rng):
    period = rng.randint(2, 3)
    cycle = rng.sample(COLORS, period)
    shown = rng.randint(period + 2, 2 * period + 2)
    items = [cycle[i % period] for i in range(shown + 1)]
    return f"Continue the pattern: {_join(items[:shown])}, ?", items[shown]


def _missing_term(rng):
    start, step = rng.randint(1, 40), rng.randint(2, 12)
    terms = [start + i * step for i in range(5)]
    hole = rng.randint(1, 3)
    shown = [str(t) if i != hole else "?" for i, t in enumerate(terms)]
    return f"Find the missing number: {', '.join(shown)}", str(terms[hole])


def _fibonacci_like(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    terms = [a, b]
    while len(terms) < 5:
        terms.append(terms[-1] + terms[-2])
    return f"Each number is the sum of the two before it: {_join(terms[:4])}, ?", str(terms[4])


def _alternating(rng):
    start, up, down = rng.randint(1, 30), rng.randint(3, 9), rng.randint(1, 8)
    terms = [start]
    for i in range(5):
        terms.append(terms[-1] + (up if i % 2 == 0 else -down))
    return f"What comes next: {_join(terms[:5])}, ?", str(terms[5])


add("number_sequence", "Continue a simple integer sequence.", "numeric",
    rg("number_sequence", min_terms=4, max_terms=5, min_value=-20, max_value=20, max_complexity=1),
    "reasoning_gym:number_sequence")
add("arithmetic_next", "The next term of an increasing arithmetic sequence.", "numeric",
    procedural(_arithmetic), "procedural")
add("geometric_next", "The next term of a doubling or tripling sequence.", "numeric", procedural(_geometric), "procedural")
add("countdown_next", "The next term of a decreasing arithmetic sequence.", "numeric",
    procedural(_countdown), "procedural")
add("next_letters", "The letter after each of three letters.", "exact", procedural(_next_letters), "procedural")
add("shift_letters", "Replace each letter of a word by the next letter of the alphabet.", "exact",
    procedural(_shift_letters), "procedural")
add("repeat_pattern", "The next colour of a repeating pattern.", "exact", procedural(_repeat_pattern), "procedural")
add("missing_term", "The missing term inside an arithmetic sequence.", "numeric",
    procedural(_missing_term), "procedural")
add("fibonacci_next", "The next term of a Fibonacci-like sequence.", "numeric",
    procedural(_fibonacci_like), "procedural")
add("alternating_next", "The next term of an up-down alternating sequence.", "numeric",
    procedural(_alternating), "procedural")
