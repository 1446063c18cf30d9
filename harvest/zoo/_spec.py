"""What a zoo task is (``ZooSpec``), the families it belongs to, and the builders shared by families.

A builder is ``build(n, seed) -> [(prompt, answer)]``: deterministic for a seed, independent of
``PYTHONHASHSEED`` (never iterate a set or a dict of strings whose order came from hashing).
Two kinds: :func:`rg` wraps a ``reasoning_gym`` generator and its configuration options;
:func:`procedural` draws ``item(rng)`` ``n`` times from one ``random.Random(seed)``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

Pairs = list[tuple[str, str]]
Builder = Callable[[int, int], Pairs]


@dataclass(frozen=True)
class Family:
    """Tasks that share a skill and differ in wording, answer format, operand ranges or language."""

    name: str
    description: str


@dataclass(frozen=True)
class ZooSpec:
    name: str
    description: str
    metric: str
    build: Builder
    source: str
    family: str
    language: str = "en"


ZOO: dict[str, ZooSpec] = {}
FAMILIES: dict[str, Family] = {}


def family(name: str, description: str) -> Callable[..., None]:
    """Declare a family; returns ``add(name, description, metric, build, source, language="en")``
    that registers one member task under it."""
    if name in FAMILIES:
        raise ValueError(f"family {name!r} declared twice")
    FAMILIES[name] = Family(name, description)

    def add(task: str, description: str, metric: str, build: Builder, source: str, language: str = "en") -> None:
        if task in ZOO:
            raise ValueError(f"zoo task {task!r} declared twice")
        ZOO[task] = ZooSpec(task, description, metric, build, source, name, language)

    return add


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def rg(name: str, rewrite: Callable[[dict], tuple[str, str]] | None = None, **config) -> Builder:
    """A builder over ``reasoning_gym.create_dataset(name, size, seed, **config)``;
    ``rewrite(item) -> (prompt, answer)`` re-phrases an item from its metadata."""

    def build(n: int, seed: int) -> Pairs:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
        items = [dataset[i] for i in range(n)]
        if rewrite is None:
            return [(item["question"].strip(), str(item["answer"]).strip()) for item in items]
        return [rewrite(item) for item in items]

    return build


def procedural(item: Callable[[random.Random], tuple[str, str]]) -> Builder:
    """A builder drawing ``item(rng)`` ``n`` times from ``random.Random(seed)``."""

    def build(n: int, seed: int) -> Pairs:
        rng = random.Random(seed)
        return [item(rng) for _ in range(n)]

    return build


def yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def options(rng: random.Random, correct: str, wrong: list[str], labels: str = "ABCD") -> tuple[str, str]:
    """Shuffle ``correct`` among ``wrong`` as ``(A) x (B) y ...``; returns (options text, correct label)."""
    choices = [correct, *wrong]
    rng.shuffle(choices)
    text = " ".join(f"({label}) {choice}" for label, choice in zip(labels, choices))
    return text, labels[choices.index(correct)]


# Short, common English words (data written here so items never depend on a download).
WORDS = tuple("""
apple river stone garden planet window pencil rabbit orange bridge candle forest monkey rocket
silver winter summer butter castle dragon guitar hammer island jacket kitten ladder lemon magnet
needle ocean pepper puzzle queen rainbow saddle tiger tomato turtle valley wagon yellow zebra
anchor basket cactus desert engine feather ginger honey igloo jungle kettle lizard marble nickel
oyster parrot quartz ribbon shadow tunnel umbrella violin walrus yogurt bottle cotton doctor
eagle farmer goose helmet insect jelly koala lobster mirror noodle onion pirate rocket spider
teapot unicorn velvet walnut almond bamboo cherry donkey falcon grape harbor iron jewel kayak
lantern meadow nectar orbit pebble quiver raven salmon tulip urchin vapor wizard
cat dog sun map cup hat pen box bus car egg fan fox jar key leg net owl pig rug sky toy van web
bird book cake coin desk door fish frog gate king lamp leaf milk moon nest rain ring rose ship
shoe star tree wolf bell corn drum farm gift hill kite lake mail nose park road salt sand seed
""".split())

COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "gray")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def words_of_distinct_lengths(rng: random.Random, k: int) -> list[str]:
    """``k`` words of ``k`` different lengths (each length drawn once, then a word of it)."""
    by_length: dict[int, list[str]] = {}
    for word in WORDS:
        by_length.setdefault(len(word), []).append(word)
    return [rng.choice(by_length[n]) for n in rng.sample(sorted(by_length), k)]


def distinct_words(rng: random.Random, k: int, pool: tuple[str, ...] = WORDS) -> list[str]:
    """``k`` different words from ``pool`` (order as drawn)."""
    return rng.sample(sorted(set(pool)), k)
