"""Answer extraction and scoring (harvest.metrics)."""

from __future__ import annotations

import pytest

from harvest.metrics import extract_choice, extract_number, kanji_to_int, normalize, score


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234 apples.", 1234),
        ("It costs $1,000,000 in total", 1_000_000),
        ("It weighs 12.5 kg", 12.5),
        ("5 - 3 - 6 = -4", -4),
        ("\u22127", -7),  # Unicode minus
        ("-0.25", -0.25),
        ("50%", 50),
        ("3/4", 0.75),
        ("１２３", 123),  # full-width digits
        ("答えは４２です", 42),
        ("合計は－３個", -3),  # full-width minus
        ("三百二十五", 325),
        ("3万5千円", 35000),
        ("I have 2 apples and 3 pears", 3),  # no marker: the last number
        ("Answer: 7. (I first tried 9)", 7),  # a marker wins over the last number
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == pytest.approx(expected)


def test_extract_number_none():
    assert extract_number("no digits here") is None


@pytest.mark.parametrize(
    "text, value",
    [("七千六百四十四", 7644), ("二〇二四", 2024), ("十", 10), ("千二百三十四", 1234), ("一億二千万", 120_000_000)],
)
def test_kanji_to_int(text, value):
    assert kanji_to_int(text) == value


@pytest.mark.parametrize(
    "text, label",
    [("(B)", "B"), ("B) because it is larger", "B"), ("Answer: C", "C"), ("The answer is (D).", "D"),
     ("A", "A"), ("答え: B", "B")],
)
def test_extract_choice(text, label):
    assert extract_choice(text) == label


def test_choice_word_labels_use_first_word():
    assert score("choice", "Yes.", "Yes") == 1.0
    assert score("choice", "No, it does not follow; yes would be wrong", "Yes") == 0.0
    assert score("choice", "True", "False") == 0.0
    assert score("choice", "(C)", "B") == 0.0


def test_numeric_score():
    assert score("numeric", "The total is 1,234.", "1234") == 1.0
    assert score("numeric", "１２", "12") == 1.0
    assert score("numeric", "13", "12") == 0.0
    assert score("numeric", "no idea", "12") == 0.0


def test_exact_normalisation():
    assert normalize("  Hello   World. ") == "hello world"
    assert score("exact", 'Answer: "tac"', "tac") == 1.0
    assert score("exact", "tac!", "TAC") == 1.0
    assert score("exact", "tca", "tac") == 0.0


def test_contains():
    assert score("contains", "The capital of France is Paris.", "paris") == 1.0
    assert score("contains", "Lyon", "Paris") == 0.0


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", "a")
