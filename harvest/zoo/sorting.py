"""Family ``sorting``: put numbers, words or letters in order (or pick by rank)."""

from __future__ import annotations

from harvest.zoo._spec import distinct_words, family, procedural, rg, words_of_distinct_lengths

add = family("sorting", "Order numbers, words, letters or digits, ascending or descending.")


def _fmt_num(text: str) -> str:
    value = float(text)
    return str(int(value)) if value == int(value) else str(value)


def _word_sort(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    order = "ascending" if meta["direction"] == "ascending" else "descending"
    return (f"Sort these words in {order} ASCII order: {', '.join(meta['transformed_words'])}",
            ", ".join(meta["sorted_words"]))


def _number_sort(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    numbers = [_fmt_num(x) for x in meta["original_numbers"]]
    ordered = [_fmt_num(x) for x in meta["sorted_numbers"]]
    return f"Sort these numbers in {meta['direction']} order: {', '.join(numbers)}", ", ".join(ordered)


def _sort_letters(rng):
    words = distinct_words(rng, 2)
    return (f"Sort the letters of each word alphabetically: {' '.join(words)}",
            " ".join("".join(sorted(w)) for w in words))


def _sort_digits(rng):
    number = str(rng.randint(1000, 99999))
    return f"Arrange the digits of {number} from smallest to largest.", "".join(sorted(number))


def _largest_first(rng):
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return (f"Order from largest to smallest: {' '.join(map(str, numbers))}",
            " ".join(map(str, sorted(numbers, reverse=True))))


def _reverse_alpha(rng):
    words = distinct_words(rng, rng.randint(3, 4))
    return f"List these words in reverse alphabetical order: {', '.join(words)}", ", ".join(sorted(words, reverse=True))


def _decimals(rng):
    values = rng.sample(range(1, 100), rng.randint(3, 4))
    shown = [f"0.{v:02d}".rstrip("0") for v in values]
    return f"Sort ascending: {', '.join(shown)}", ", ".join(s for _, s in sorted(zip(values, shown)))


def _by_length(rng):
    words = words_of_distinct_lengths(rng, 3)
    return f"Sort these words from shortest to longest: {', '.join(words)}", ", ".join(sorted(words, key=len))


def _with_negatives(rng):
    numbers = rng.sample(range(-30, 31), rng.randint(3, 5))
    return f"Sort from smallest to largest: {', '.join(map(str, numbers))}", ", ".join(map(str, sorted(numbers)))


def _second_largest(rng):
    numbers = rng.sample(range(1, 100), rng.randint(4, 5))
    return f"What is the second largest number in: {', '.join(map(str, numbers))}?", str(sorted(numbers)[-2])


add("word_sort", "Sort a few words in ASCII order, ascending or descending.", "exact",
    rg("word_sorting", _word_sort, min_words=3, max_words=4, min_word_length=3, max_word_length=7),
    "reasoning_gym:word_sorting")
add("number_sort", "Sort three or four whole numbers ascending or descending.", "exact",
    rg("number_sorting", _number_sort, min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0,
       min_value=0, max_value=99), "reasoning_gym:number_sorting")
add("sort_letters", "Sort the letters of each of two words alphabetically.", "exact", procedural(_sort_letters), "procedural")
add("sort_digits", "Sort the digits of a four- or five-digit number.", "exact", procedural(_sort_digits), "procedural")
add("largest_first", "Order three to five numbers from largest to smallest (space separated).", "exact",
    procedural(_largest_first), "procedural")
add("reverse_alpha", "List three or four words in reverse alphabetical order.", "exact",
    procedural(_reverse_alpha), "procedural")
add("sort_decimals", "Sort three or four decimals between 0 and 1.", "exact", procedural(_decimals), "procedural")
add("sort_by_length", "Sort three words of different lengths from shortest to longest.", "exact",
    procedural(_by_length), "procedural")
add("sort_negatives", "Sort three to five numbers between -30 and 30.", "exact",
    procedural(_with_negatives), "procedural")
add("second_largest", "Pick the second largest of four or five numbers.", "numeric",
    procedural(_second_largest), "procedural")
