"""Family ``ja_numerals``: Japanese kanji numerals read, written, compared and counted (Japanese prompts)."""

from __future__ import annotations

import random

from harvest.zoo._spec import Pairs, family, options, procedural

add = family("ja_numerals", "Read, write and compare Japanese kanji numerals (Japanese prompts).")

# Reading tasks added in zoo v2 score ``exact``: the ``numeric`` metric reads kanji numerals too, so
# under it a model that copies the prompt's numeral would count as right.

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


def _kanji_hundreds(rng):
    value = rng.randint(100, 999)
    return f"次の漢数字は算用数字でいくつですか？ {int_to_kanji(value)}", str(value)


def _kanji_man(rng):
    value = rng.randint(1, 999) * 1000 + rng.choice((0, rng.randint(1, 999)))
    return f"漢数字を数字で書いてください: {int_to_kanji(value)}", str(value)


def _to_kanji(rng):
    value = rng.randint(1, 9999)
    return f"数字を漢数字に: {value}", int_to_kanji(value)


def _to_kanji_man(rng):
    value = rng.randint(1, 999) * 1000
    return f"次の数を漢数字で書いてください: {value}", int_to_kanji(value)


def _kanji_larger(rng):
    a, b = rng.sample(range(10, 1000), 2)
    text, label = options(rng, int_to_kanji(max(a, b)), [int_to_kanji(min(a, b))], labels="AB")
    return f"大きい方はどちらですか？ {text}", label


def _kanji_next(rng):
    value = rng.randint(1, 9998)
    return f"{int_to_kanji(value)}の次の数を漢数字で答えてください。", int_to_kanji(value + 1)


def _kanji_previous(rng):
    value = rng.randint(2, 9999)
    return f"{int_to_kanji(value)}の一つ前の数を漢数字で答えてください。", int_to_kanji(value - 1)


def _positional(rng):
    value = rng.randint(1000, 2999)
    return f"「{''.join(_KANJI[int(d)] for d in str(value))}」を算用数字で書いてください。", str(value)


add("ja_kanji_numbers", "Write a Japanese kanji numeral in Arabic digits (Japanese prompt).", "numeric",
    _ja_kanji_numbers, "procedural", language="ja")
add("ja_kanji_hundreds", "Read a three-digit kanji numeral (another wording).", "exact",
    procedural(_kanji_hundreds), "procedural", language="ja")
add("ja_kanji_man", "Read a kanji numeral with 万 (ten thousands).", "exact",
    procedural(_kanji_man), "procedural", language="ja")
add("ja_to_kanji", "Write a number up to 9999 as a kanji numeral.", "exact",
    procedural(_to_kanji), "procedural", language="ja")
add("ja_to_kanji_man", "Write a multiple of 1000 up to 999000 as a kanji numeral.", "exact",
    procedural(_to_kanji_man), "procedural", language="ja")
add("ja_kanji_larger", "Pick the larger of two kanji numerals (A or B).", "choice",
    procedural(_kanji_larger), "procedural", language="ja")
add("ja_kanji_next", "The next number, written in kanji.", "exact", procedural(_kanji_next), "procedural", language="ja")
add("ja_kanji_previous", "The previous number, written in kanji.", "exact",
    procedural(_kanji_previous), "procedural", language="ja")
add("ja_kanji_positional", "Read a year written digit by digit in kanji (二〇二四).", "exact",
    procedural(_positional), "procedural", language="ja")
