"""Family ``counting``: count letters, words, digits, items or legs."""

from __future__ import annotations

from harvest.zoo._spec import WORDS, distinct_words, family, procedural, rg

add = family("counting", "Count letters, words, digits, list items or things; the answer is a number.")


def _legs(item: dict) -> tuple[str, str]:
    animals = item["metadata"]["animals"]
    listing = ", ".join(f"{count} {animal}" for animal, count in animals.items())
    return f"How many legs in total: {listing}?", str(item["answer"])


def _word_count(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    return f"How many words are in this text: {' '.join(words)}", str(len(words))


def _vowel_count(rng):
    word = rng.choice(WORDS) + rng.choice(WORDS)
    return f"How many vowels (a, e, i, o, u) are in '{word}'?", str(sum(c in "aeiou" for c in word))


def _word_length(rng):
    word = rng.choice(WORDS) + rng.choice(["", "s", "ing", "er", "ly"])
    return f"How many letters does '{word}' have?", str(len(word))


def _digit_count(rng):
    number = rng.randint(1, 10 ** rng.randint(1, 9))
    return f"How many digits does {number} have?", str(len(str(number)))


def _occurrences(rng):
    values = [rng.randint(1, 5) for _ in range(rng.randint(5, 8))]
    target = rng.choice(values)
    return f"How many times does {target} appear in: {', '.join(map(str, values))}?", str(values.count(target))


def _count_evens(rng):
    values = [rng.randint(1, 50) for _ in range(rng.randint(3, 7))]
    return f"How many even numbers are in: {', '.join(map(str, values))}?", str(sum(v % 2 == 0 for v in values))


def _list_items(rng):
    words = distinct_words(rng, rng.randint(2, 9))
    return f"How many items are in this list: {', '.join(words)}?", str(len(words))


add("letter_count", "Count how often a letter occurs in a short text.", "numeric",
    rg("letter_counting", min_words=1, max_words=3), "reasoning_gym:letter_counting")
add("leg_count", "Count the legs of one or two kinds of animals.", "numeric",
    rg("leg_counting", _legs, min_animals=1, max_animals=2, max_instances=5), "reasoning_gym:leg_counting")
add("count_bits", "Count the 1 bits in the binary form of a number below 1024.", "numeric",
    rg("count_bits", min_n=1, max_n=1023), "reasoning_gym:count_bits")
add("word_count", "Count the words of a short text.", "numeric", procedural(_word_count), "procedural")
add("vowel_count", "Count the vowels in a compound word.", "numeric", procedural(_vowel_count), "procedural")
add("word_length", "Count the letters of a word.", "numeric", procedural(_word_length), "procedural")
add("digit_count", "Count the digits of a number.", "numeric", procedural(_digit_count), "procedural")
add("count_occurrences", "Count how often a number occurs in a short list.", "numeric",
    procedural(_occurrences), "procedural")
add("count_evens", "Count the even numbers in a short list.", "numeric", procedural(_count_evens), "procedural")
add("list_length", "Count the items of a comma-separated list.", "numeric", procedural(_list_items), "procedural")
