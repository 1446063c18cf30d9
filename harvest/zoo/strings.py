"""Family ``string_edit``: rewrite a word or a few words letter by letter or word by word."""

from __future__ import annotations

from harvest.zoo._spec import WORDS, distinct_words, family, procedural, rg

add = family("string_edit", "Rewrite a short word or word list (reverse, reorder, drop or repeat letters).")

_VOWELS = "aeiou"


def _word_reversal(item: dict) -> tuple[str, str]:
    words = item["metadata"]["words"]
    return f"Reverse the order of these words: {', '.join(words)}", ", ".join(reversed(words))


def _uppercase(item: dict) -> tuple[str, str]:
    word = item["metadata"]["word"]
    return f"Write this word in capital letters: {word}", word.upper()


def _unscramble(item: dict) -> tuple[str, str]:
    meta = item["metadata"]
    return f"Unscramble the letters of each word: {' '.join(meta['scrambled_words'])}", " ".join(meta["original_words"])


def _first_letters(rng):
    words = distinct_words(rng, rng.randint(3, 5))
    return f"Write the first letter of each word: {' '.join(words)}", "".join(w[0] for w in words)


def _last_letter(rng):
    word = rng.choice(WORDS)
    suffix = " ".join(distinct_words(rng, 2))  # context words make the prompt space large enough
    return f"What is the last letter of the word '{word}'? (Ignore: {suffix})", word[-1]


def _remove_vowels(rng):
    word = rng.choice([w for w in WORDS if any(c not in _VOWELS for c in w)])
    other = rng.choice(WORDS)
    return (f"Remove the vowels from these words: {word} {other}",
            " ".join("".join(c for c in w if c not in _VOWELS) or "-" for w in (word, other)))


def _double_letters(rng):
    word = rng.choice([w for w in WORDS if len(w) <= 5])
    other = rng.choice([w for w in WORDS if len(w) == 3])
    return f"Repeat every letter twice: {word} {other}", " ".join("".join(c * 2 for c in w) for w in (word, other))


def _dashes(rng):
    words = distinct_words(rng, 2)
    return f"Put a dash between the letters of each word: {' '.join(words)}", " ".join("-".join(w) for w in words)


def _swap_ends(rng):
    words = distinct_words(rng, rng.randint(3, 5))
    swapped = [words[-1], *words[1:-1], words[0]]
    return f"Swap the first and last words: {' '.join(words)}", " ".join(swapped)


add("spell_backward", "Spell a short English word backward.", "exact",
    rg("spell_backward", min_word_len=3, max_word_len=6), "reasoning_gym:spell_backward")
add("word_reversal", "Reverse the order of a short list of words.", "exact",
    rg("word_sequence_reversal", _word_reversal, min_words=3, max_words=4), "reasoning_gym:word_sequence_reversal")
add("sentence_reorder", "Restore the word order of a short shuffled sentence.", "exact",
    rg("sentence_reordering", min_words_in_sentence=3, max_words_in_sentence=6), "reasoning_gym:sentence_reordering")
add("uppercase", "Write a short word in capital letters.", "exact",
    rg("spell_backward", _uppercase, min_word_len=3, max_word_len=8), "reasoning_gym:spell_backward (its words)")
add("unscramble", "Unscramble the letters of one or two short words.", "exact",
    rg("letter_jumble", _unscramble, min_word_len=3, max_word_len=6, min_words=1, max_words=2,
       min_corruption_level=0.1, max_corruption_level=0.5), "reasoning_gym:letter_jumble")
add("first_letters", "Join the first letters of three to five words.", "exact", procedural(_first_letters), "procedural")
add("last_letter", "Name the last letter of a word.", "exact", procedural(_last_letter), "procedural")
add("remove_vowels", "Drop the vowels from two words.", "exact", procedural(_remove_vowels), "procedural")
add("double_letters", "Write every letter of two short words twice.", "exact", procedural(_double_letters), "procedural")
add("dash_letters", "Put dashes between the letters of two words.", "exact", procedural(_dashes), "procedural")
add("swap_ends", "Swap the first and last of three to five words.", "exact", procedural(_swap_ends), "procedural")
