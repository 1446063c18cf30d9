"""Family ``multiple_choice``: pick the option that fits, answered with its letter."""

from __future__ import annotations

from harvest.zoo._spec import distinct_words, family, options, procedural, words_of_distinct_lengths

add = family("multiple_choice", "Pick the right option among two to four; the answer is its letter.")

_CATEGORIES = {
    "animal": ("dog", "cat", "horse", "tiger", "rabbit", "monkey", "zebra", "eagle", "goose", "wolf", "fox", "owl"),
    "fruit": ("apple", "pear", "plum", "grape", "cherry", "lemon", "orange", "banana", "mango", "peach", "melon", "fig"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "gray", "orange", "violet"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "axe", "ladder", "file", "tape"),
}


def _larger(rng):
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which number is larger? (A) {a} (B) {b}", "A" if a > b else "B"


def _smaller(rng):
    values = rng.sample(range(1, 1000), 3)
    text, label = options(rng, str(min(values)), [str(v) for v in values if v != min(values)])
    return f"Which number is the smallest? {text}", label


def _sum_choice(rng):
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    wrong = rng.sample([a + b + d for d in (-10, -2, -1, 1, 2, 10)], 2)
    text, label = options(rng, str(a + b), [str(w) for w in wrong])
    return f"What is {a} + {b}? {text}", label


def _even_choice(rng):
    even = rng.randrange(2, 200, 2)
    odd = rng.sample(range(1, 200, 2), 2)
    text, label = options(rng, str(even), [str(v) for v in odd])
    return f"Which number is even? {text}", label


def _odd_one_out(rng):
    category, other = rng.sample(sorted(_CATEGORIES), 2)
    members = rng.sample(_CATEGORIES[category], 3)
    intruder = rng.choice([w for w in _CATEGORIES[other] if w not in _CATEGORIES[category]])
    text, label = options(rng, intruder, members)
    return f"Which word does not belong with the others? {text}", label


def _first_alphabetical(rng):
    words = distinct_words(rng, 3)
    text, label = options(rng, min(words), [w for w in words if w != min(words)])
    return f"Which word comes first in alphabetical order? {text}", label


def _longest(rng):
    words = words_of_distinct_lengths(rng, 3)
    longest = max(words, key=len)
    text, label = options(rng, longest, [w for w in words if w != longest])
    return f"Which word has the most letters? {text}", label


def _multiple_of(rng):
    k = rng.randint(3, 9)
    right = k * rng.randint(2, 20)
    wrong = []
    while len(wrong) < 2:
        value = rng.randint(10, 180)
        if value % k and value not in wrong:
            wrong.append(value)
    text, label = options(rng, str(right), [str(v) for v in wrong])
    return f"Which number is a multiple of {k}? {text}", label


def _true_statement(rng):
    a, b = rng.sample(range(1, 100), 2)
    c, d = rng.sample(range(1, 100), 2)
    true = f"{max(a, b)} > {min(a, b)}"
    false = f"{min(c, d)} > {max(c, d)}"
    text, label = options(rng, true, [false], labels="AB")
    return f"Which statement is true? {text}", label


def _closest(rng):
    target = rng.randint(10, 90)
    offsets = rng.sample(range(1, 30), 3)
    values = [target + o * rng.choice((-1, 1)) for o in offsets]
    best = values[offsets.index(min(offsets))]
    text, label = options(rng, str(best), [str(v) for v in values if v != best])
    return f"Which number is closest to {target}? {text}", label


add("larger_choice", "Pick the larger of two numbers as option A or B.", "choice", procedural(_larger), "procedural")
add("smallest_choice", "Pick the smallest of three numbers.", "choice", procedural(_smaller), "procedural")
add("sum_choice", "Pick the right sum of two numbers among three options.", "choice",
    procedural(_sum_choice), "procedural")
add("even_choice", "Pick the even number among three.", "choice", procedural(_even_choice), "procedural")
add("odd_one_out", "Pick the word that belongs to another category.", "choice", procedural(_odd_one_out), "procedural")
add("first_alphabetical", "Pick the word that comes first alphabetically.", "choice",
    procedural(_first_alphabetical), "procedural")
add("longest_word_choice", "Pick the word with the most letters.", "choice", procedural(_longest), "procedural")
add("multiple_choice_of", "Pick the multiple of k among three numbers.", "choice",
    procedural(_multiple_of), "procedural")
add("true_statement", "Pick the true one of two comparisons.", "choice", procedural(_true_statement), "procedural")
add("closest_choice", "Pick the number closest to a target.", "choice", procedural(_closest), "procedural")
