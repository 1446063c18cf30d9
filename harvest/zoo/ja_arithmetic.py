"""Family ``ja_arithmetic``: arithmetic asked in Japanese (words, symbols, kanji operands, word problems)."""

from __future__ import annotations

import random

from harvest.zoo._spec import Pairs, family, procedural
from harvest.zoo.ja_numerals import int_to_kanji

add = family("ja_arithmetic", "Arithmetic asked in Japanese; the answer is a number.")

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


def _tasu(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 9)
    return f"{a}たす{b}はいくつですか？", str(a + b)


def _hiku(rng):
    a = rng.randint(10, 99)
    b = rng.randint(1, 9)
    return f"{a}ひく{b}はいくつですか？", str(a - b)


def _kakeru(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 99)
    return f"{b}かける{a}は？", str(a * b)


def _wa(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}と{b}の和を求めなさい。", str(a + b)


def _sa(rng):
    a, b = rng.sample(range(10, 100), 2)
    return f"{a}と{b}の差を求めなさい。", str(abs(a - b))


def _seki(rng):
    a, b = rng.randint(2, 9), rng.randint(11, 60)
    return f"{a}と{b}の積は？", str(a * b)


def _kanji_operands(rng):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"{int_to_kanji(a)}足す{int_to_kanji(b)}は？ 数字で答えてください。", str(a + b)


def _eat(rng):
    fruit = rng.choice(("りんご", "みかん", "いちご", "あめ", "クッキー"))
    total = rng.randint(5, 60)
    eaten = rng.randint(1, total - 1)
    return f"{fruit}が{total}個あります。{eaten}個食べると、残りは何個ですか？", str(total - eaten)


def _buy(rng):
    item = rng.choice(("えんぴつ", "ノート", "消しゴム", "ペン"))
    price, count = rng.randrange(10, 200, 10), rng.randint(2, 9)
    return f"{item}を1つ{price}円で{count}つ買いました。全部で何円ですか？", str(price * count)


def _half_double(rng):
    n = rng.randint(3, 399)
    if rng.random() < 0.5:
        return f"{2 * n}の半分はいくつですか？", str(n)
    return f"{n}の2倍はいくつですか？", str(2 * n)


add("ja_fullwidth_arith", "Add or subtract a one-digit full-width number to or from a two-digit one (Japanese prompt).",
    "numeric", _ja_fullwidth_add, "procedural", language="ja")
add("ja_tasu", "Add a one-digit number, asked with たす.", "numeric", procedural(_tasu), "procedural", language="ja")
add("ja_hiku", "Subtract a one-digit number, asked with ひく.", "numeric", procedural(_hiku), "procedural", language="ja")
add("ja_kakeru", "Multiply by a one-digit number, asked with かける.", "numeric",
    procedural(_kakeru), "procedural", language="ja")
add("ja_wa", "The sum (和) of two two-digit numbers.", "numeric", procedural(_wa), "procedural", language="ja")
add("ja_sa", "The difference (差) of two two-digit numbers.", "numeric", procedural(_sa), "procedural", language="ja")
add("ja_seki", "The product (積) of a one-digit and a two-digit number.", "numeric",
    procedural(_seki), "procedural", language="ja")
add("ja_kanji_add", "Add two numbers written in kanji; answer in digits.", "numeric",
    procedural(_kanji_operands), "procedural", language="ja")
add("ja_eat_problem", "A take-away word problem (食べると残りは).", "numeric", procedural(_eat), "procedural", language="ja")
add("ja_buy_problem", "A unit-price word problem (全部で何円).", "numeric", procedural(_buy), "procedural", language="ja")
add("ja_half_double", "Half or double of a number (半分 / 2倍).", "numeric",
    procedural(_half_double), "procedural", language="ja")
