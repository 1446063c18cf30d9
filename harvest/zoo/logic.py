"""Family ``logic``: decide a yes/no, true/false or relation question."""

from __future__ import annotations

import random
from collections import Counter

from harvest.zoo._spec import Pairs, family, procedural, rg, yes_no

add = family("logic", "Decide a yes/no or true/false question, or name a relation, by reasoning.")


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


def isomorphic_pair(a: str, b: str) -> bool:
    """Whether one-to-one character substitution maps ``a`` onto ``b``."""
    return len(a) == len(b) and len(set(a)) == len(set(b)) == len(set(zip(a, b)))


def isomorphic(n: int, seed: int) -> Pairs:
    """Own generator (reasoning_gym's ``isomorphic_strings`` depends on PYTHONHASHSEED); about half
    of the pairs are isomorphic (the second string is a relabelling of the first), half not.
    Not in the zoo: its harvested LoRA did not beat the base model (0.54 vs 0.54 on 100 test items)."""
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
            while isomorphic_pair(a, b):
                b = "".join(rng.choices("hijklmnopq", k=len(a)))
        out.append((f"Are the strings \"{a}\" and \"{b}\" isomorphic? Answer True or False.",
                    str(isomorphic_pair(a, b))))
    return out


def _bool_expression(rng):
    """``(a op b) op (c op d)`` over True/False literals, each maybe negated."""
    literals = [(rng.random() < 0.5, rng.random() < 0.5) for _ in range(4)]  # (value, negated)
    texts = [("not " if negated else "") + str(value) for value, negated in literals]
    values = [value != negated for value, negated in literals]
    ops = [rng.choice(("and", "or")) for _ in range(3)]

    def apply(op, x, y):
        return (x and y) if op == "and" else (x or y)

    total = apply(ops[1], apply(ops[0], values[0], values[1]), apply(ops[2], values[2], values[3]))
    return f"Evaluate: ({texts[0]} {ops[0]} {texts[1]}) {ops[1]} ({texts[2]} {ops[2]} {texts[3]})", str(total)


def _greater(rng):
    a, b = rng.sample(range(1, 1000), 2)
    return f"Is {a} greater than {b}? Answer Yes or No.", yes_no(a > b)


def _even_odd(rng):
    n = rng.randint(1, 9999)
    return f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _divisible(rng):
    k = rng.randint(2, 12)
    n = k * rng.randint(2, 30) + (0 if rng.random() < 0.5 else rng.randint(1, k - 1))
    return f"Is {n} divisible by {k}? Answer Yes or No.", yes_no(n % k == 0)


def _between(rng):
    low, high = sorted(rng.sample(range(1, 100), 2))
    n = rng.randint(1, 100)
    return f"Is {n} between {low} and {high}? Answer Yes or No.", yes_no(low < n < high)


def _all_positive(rng):
    values = [rng.randint(1, 40) for _ in range(rng.randint(3, 5))]
    if rng.random() < 0.5:
        values[rng.randrange(len(values))] *= -1
    listing = ", ".join(map(str, values))
    return f"Are all of these numbers positive: {listing}? Answer Yes or No.", yes_no(min(values) > 0)


add("syllogism", "Decide whether a conclusion follows from two premises (Yes or No).", "choice",
    rg("syllogism"), "reasoning_gym:syllogism")
add("ransom_note", "Decide whether a note can be built from a magazine's letters (True or False).", "choice",
    _ransom_note, "generated (seeded)")
add("family_relation", "Name the family relationship between two people in a small family.", "exact",
    rg("family_relationships", min_family_size=3, max_family_size=4), "reasoning_gym:family_relationships")
add("sibling_riddle", "Count sisters or brothers in an 'Alice in Wonderland' sibling riddle.", "numeric",
    rg("aiw"), "reasoning_gym:aiw")
add("bool_expression", "Evaluate a small Boolean expression (True or False).", "choice",
    procedural(_bool_expression), "procedural")
add("greater_yes_no", "Is one number greater than another (Yes or No).", "choice", procedural(_greater), "procedural")
add("even_or_odd", "Say whether a number is even or odd.", "exact", procedural(_even_odd), "procedural")
add("divisible_yes_no", "Is a number divisible by k (Yes or No).", "choice", procedural(_divisible), "procedural")
add("between_yes_no", "Is a number strictly between two others (Yes or No).", "choice",
    procedural(_between), "procedural")
add("all_positive", "Are all numbers of a list positive (Yes or No).", "choice", procedural(_all_positive), "procedural")
