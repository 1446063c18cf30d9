"""Family ``number_format``: write a number in another form (words, Roman numerals, bases, units)."""

from __future__ import annotations

from harvest.zoo._spec import family, procedural, rg

add = family("number_format", "Write a number in another form: words, Roman numerals, bases, percent, units.")

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
          (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000 (``342`` -> ``three hundred forty-two``)."""
    if not 0 <= n < 1000:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def roman(n: int) -> str:
    """Roman numeral for 1 <= n < 4000."""
    out = ""
    for value, letters in _ROMAN:
        count, n = divmod(n, value)
        out += letters * count
    return out


def _base_conversion(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    return (f"Convert the base-{meta['source_base']} number {meta['source_repr']} to base-{meta['target_base']}.",
            str(item["answer"]))


def _to_words(rng):
    n = rng.randint(1, 999)
    return f"Write {n} in English words.", number_words(n)


def _from_words(rng):
    n = rng.randint(1, 999)
    return f"Write '{number_words(n)}' as digits.", str(n)


def _from_roman(rng):
    n = rng.randint(1, 500)
    return f"What number is the Roman numeral {roman(n)}?", str(n)


def _to_roman(rng):
    n = rng.randint(1, 500)
    return f"Write {n} as a Roman numeral.", roman(n)


def _commas(rng):
    n = rng.randint(1000, 99_999_999)
    return f"Write {n} with commas between the thousands.", f"{n:,}"


def _round_ten(rng):
    n = rng.randint(10, 9999)
    while n % 10 == 5:
        n = rng.randint(10, 9999)
    return f"Round {n} to the nearest ten.", str(round(n, -1))


def _percent_of(rng):
    p, base = rng.choice([10, 20, 25, 30, 40, 50, 60, 75, 80, 90]), rng.randrange(20, 2000, 20)
    return f"What is {p}% of {base}?", str(p * base // 100)


def _decimal_to_percent(rng):
    thousandths = rng.randint(1, 1999)
    shown = f"{thousandths / 1000:.3f}".rstrip("0").rstrip(".")
    return f"Write {shown} as a percentage.", f"{thousandths / 10:g}%"


def _meters_to_cm(rng):
    tenths = rng.randint(1, 999)
    meters = f"{tenths / 10:.1f}".rstrip("0").rstrip(".")
    return f"How many centimeters are in {meters} meters?", str(tenths * 10)


add("base_conversion", "Convert a small number between bases 2 to 10.", "exact",
    rg("base_conversion", _base_conversion, min_base=2, max_base=10, min_value=0, max_value=64),
    "reasoning_gym:base_conversion")
add("fraction_simplify", "Reduce a small fraction to lowest terms.", "exact",
    rg("fraction_simplification", min_value=1, max_value=20, min_factor=2, max_factor=9, styles=("plain",)),
    "reasoning_gym:fraction_simplification")
add("number_to_words", "Write a number below 1000 in English words.", "exact", procedural(_to_words), "procedural")
add("words_to_number", "Write a number given in English words as digits.", "numeric",
    procedural(_from_words), "procedural")
add("roman_to_number", "Read a Roman numeral up to 500.", "numeric", procedural(_from_roman), "procedural")
add("number_to_roman", "Write a number up to 500 as a Roman numeral.", "exact", procedural(_to_roman), "procedural")
add("thousands_commas", "Write a number with thousands separators.", "exact", procedural(_commas), "procedural")
add("round_to_ten", "Round a number to the nearest ten.", "numeric", procedural(_round_ten), "procedural")
add("percent_of", "A round percentage of a number.", "numeric", procedural(_percent_of), "procedural")
add("decimal_to_percent", "Write a decimal as a percentage.", "numeric", procedural(_decimal_to_percent), "procedural")
add("meters_to_cm", "Meters (with one decimal) as centimeters.", "numeric", procedural(_meters_to_cm), "procedural")
