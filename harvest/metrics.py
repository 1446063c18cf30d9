"""Scoring a generated text against a task's reference answer.

Four metrics, all returning 1.0 or 0.0:

- ``exact``: equal after normalisation (Unicode NFKC, case, whitespace, surrounding quotes,
  trailing punctuation, a leading ``Answer:``).
- ``numeric``: the number extracted from the prediction equals the reference number. Handles
  thousands separators (``1,234``), units (``12 kg``, ``$5``, ``50%``), negatives (``-3``, ``−3``),
  decimals, simple fractions (``3/4``), Japanese full-width digits (``１２３``) and Japanese
  kanji numerals (``三百二十五``, ``3万5千``). A marker such as ``answer is``, ``Answer:``, ``=``,
  ``####`` or ``答え`` picks the number after it; otherwise the last number in the text counts.
- ``choice``: the option label in the prediction equals the reference label. Letters are read from
  ``(B)``, ``B)``, ``B.``, ``Answer: B``, ``答え: B`` or a lone ``B``; word labels (``Yes``, ``True``)
  from the first word of the prediction or the word after an answer marker.
- ``contains``: the normalised reference occurs in the normalised prediction.
"""

from __future__ import annotations

import math
import re
import unicodedata

METRICS = ("exact", "numeric", "choice", "contains")

_TRAILING_PUNCT = ".,;:!?。．、，！？ \t\n"
_QUOTES = "\"'`“”‘’「」『』"
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|答え|回答|解答)\s*(?:is|は)?\s*[:：]?\s*", re.I)


def normalize(text: str) -> str:
    """NFKC, casefold, collapse whitespace, strip quotes, trailing punctuation and ``Answer:``."""
    text = unicodedata.normalize("NFKC", str(text)).replace("\u2212", "-")
    text = " ".join(text.split()).casefold()
    text = _ANSWER_PREFIX.sub("", text)
    previous = None
    while previous != text:
        previous = text
        text = text.strip(_TRAILING_PUNCT).strip(_QUOTES)
    return text


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

_KANJI_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9,
                 "壱": 1, "弐": 2, "参": 3}
_KANJI_SMALL = {"十": 10, "百": 100, "千": 1000}
_KANJI_LARGE = {"万": 10**4, "億": 10**8, "兆": 10**12}
_KANJI_RUN = re.compile(r"[0-9〇零一二三四五六七八九壱弐参十百千万億兆]+")


def kanji_to_int(text: str) -> int | None:
    """Value of a Japanese numeral (``三百二十五`` -> 325, ``二〇二四`` -> 2024, ``3万5千`` -> 35000)."""
    if not text or not any(ch in _KANJI_DIGITS or ch in _KANJI_SMALL or ch in _KANJI_LARGE for ch in text):
        return None
    if all(ch in _KANJI_DIGITS or ch.isdigit() for ch in text):  # positional: 二〇二四
        return int("".join(str(_KANJI_DIGITS.get(ch, ch)) for ch in text))
    total, section, number = 0, 0, None
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit():
            j = i
            while j < len(text) and text[j].isdigit():
                j += 1
            number = int(text[i:j])
            i = j
            continue
        if ch in _KANJI_DIGITS:
            number = (number or 0) * 10 + _KANJI_DIGITS[ch] if number is not None else _KANJI_DIGITS[ch]
        elif ch in _KANJI_SMALL:
            section += (1 if number is None else number) * _KANJI_SMALL[ch]
            number = None
        elif ch in _KANJI_LARGE:
            section += number or 0
            total += (section or 1) * _KANJI_LARGE[ch]
            section, number = 0, None
        i += 1
    return total + section + (number or 0)


def _replace_kanji_numerals(text: str) -> str:
    def repl(match: re.Match) -> str:
        run = match.group(0)
        if run.isdigit():
            return run
        value = kanji_to_int(run)
        return run if value is None else str(value)

    return _KANJI_RUN.sub(repl, text)


_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?|[-+]?\.\d+"
)
_MARKERS = re.compile(r"(?:answer\s*(?:is|:|=)|result\s*(?:is|:)|####|=|答えは|答え\s*[:：]|合計は)", re.I)


def _to_float(token: str) -> float | None:
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(token)
    except ValueError:
        return None


def _prepare_numeric(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text))  # full-width digits, commas, minus signs
    text = text.replace("\u2212", "-").replace("\u2012", "-").replace("\u2013", "-")
    text = _replace_kanji_numerals(text)
    # a minus sign glued to a currency/unit prefix: "-$5" / "$-5"
    text = re.sub(r"-\s*[$€£¥]\s*(?=\d)", "-", text)
    text = re.sub(r"[$€£¥]\s*", "", text)
    return text


def extract_numbers(text: str) -> list[float]:
    """Every number in the text, in order."""
    prepared = _prepare_numeric(text)
    values = [_to_float(m.group(0)) for m in _NUMBER.finditer(prepared)]
    return [v for v in values if v is not None]


def extract_number(text: str) -> float | None:
    """The answer number in a generated text: the first after the last answer marker, else the last."""
    prepared = _prepare_numeric(text)
    matches = list(_NUMBER.finditer(prepared))
    if not matches:
        return None
    markers = list(_MARKERS.finditer(prepared))
    chosen = None
    for marker in reversed(markers):
        after = [m for m in matches if m.start() >= marker.end()]
        if after:
            chosen = after[0]
            break
    chosen = chosen or matches[-1]
    return _to_float(chosen.group(0))


def numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


# --------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------

_CHOICE_PATTERNS = [
    re.compile(r"(?:answer|答え|回答|option|choice)\s*(?:is|は)?\s*[:：]?\s*\(?([A-Z])\b\)?", re.I),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"(?:^|\s)([A-Z])\)"),
    re.compile(r"^\s*([A-Z])(?:[.:]|\s|$)"),
]


def extract_choice(text: str, labels: list[str] | None = None) -> str | None:
    """The option label in a generated text (``(B)``, ``B)``, ``Answer: B``, a lone ``B``).

    With word ``labels`` (e.g. ``["Yes", "No"]``) the first label word found wins.
    """
    text = unicodedata.normalize("NFKC", str(text)).strip()
    if labels and not all(len(label) == 1 for label in labels):
        norm = normalize(text)
        after = _ANSWER_PREFIX.sub("", norm)
        words = re.findall(r"[\w-]+", after)
        wanted = {normalize(label): label for label in labels}
        for word in words:
            if word in wanted:
                return wanted[word]
        return None
    for pattern in _CHOICE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def score(metric: str, prediction: str, answer: str) -> float:
    """1.0 if ``prediction`` is right for reference ``answer`` under ``metric``, else 0.0."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (use one of {', '.join(METRICS)})")
    prediction = "" if prediction is None else str(prediction)
    if metric == "exact":
        return float(normalize(prediction) == normalize(answer))
    if metric == "contains":
        ref = normalize(answer)
        return float(bool(ref) and ref in normalize(prediction))
    if metric == "numeric":
        ref = extract_number(answer)
        if ref is None:
            return float(normalize(prediction) == normalize(answer))
        got = extract_number(prediction)
        return float(got is not None and numbers_equal(got, ref))
    # choice
    ref = normalize(answer)
    if len(ref) == 1 and ref.isalpha():
        got = extract_choice(prediction)
        return float(got is not None and got.casefold() == ref)
    # the first word decides for word labels ("No, it does not follow" vs "Yes")
    words = re.findall(r"[\w-]+", _ANSWER_PREFIX.sub("", normalize(prediction)))
    return float(bool(words) and words[0] == ref)
