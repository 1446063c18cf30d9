"""Held-out protocols of the bench: which tasks a generator may train on and which it is tested on.

Pure functions over ``{task: family}``; every choice is deterministic (sorted names, evenly spread
picks), so two runs on the same zoo hold out the same tasks.

- ``variants``: unseen *members of seen families*: from each of ``n`` families (spread over the
  families that have at least 3 bench tasks) one member is held out; every other task trains.
  Both protocols hold out only *learnable* tasks when the caller knows which they are (their own
  harvested LoRA beats the base by a margin, from stored evaluations).
  DnD's own protocol: the held-out dataset shares its domain and format with training datasets.
- ``families``: *whole families* held out: ``n`` families (spread), up to ``members`` of each
  evaluated; no task of a held-out family trains.
- ``custom``: the held-out tasks the user named; all other bench tasks train.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("variants", "families")


@dataclass(frozen=True)
class Split:
    protocol: str
    held_out: tuple[str, ...]     # evaluated tasks
    training: tuple[str, ...]     # tasks generators, the multitask LoRA and the retrieval pool may use
    held_out_families: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "held_out": list(self.held_out), "training": list(self.training),
                "held_out_families": list(self.held_out_families)}


def spread(items: list, count: int | None) -> list:
    """At most ``count`` of ``items``, spread evenly over the list (all of them when ``count`` is None)."""
    if count is None or len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step + step / 2)] for i in range(count)]


def _members(families: dict[str, str | None]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task in sorted(families):
        if families[task]:
            out.setdefault(families[task], []).append(task)
    return out


def _candidates(tasks: list[str], learnable: set[str] | None) -> list[str]:
    """The tasks worth holding out: those whose own LoRA learns them (all when that is unknown)."""
    return list(tasks) if learnable is None else [t for t in tasks if t in learnable]


def variants_split(families: dict[str, str | None], n: int, learnable: set[str] | None = None) -> Split:
    """One unseen member from each of ``n`` families with at least 3 bench tasks.

    With ``learnable`` (tasks whose own harvest beats the base by a margin), only those are held out
    and families without one are passed over: a held-out task its own LoRA cannot learn has no gain
    to transfer, so every method ties at the base there and the split measures nothing."""
    members = _members(families)
    eligible = [f for f in sorted(members) if len(members[f]) >= 3 and _candidates(members[f], learnable)]
    if not eligible:
        raise ValueError("the variants protocol needs a family with at least 3 harvested tasks"
                         + (", one of them learnable" if learnable is not None else ""))
    held = [spread(_candidates(members[f], learnable), 1)[0] for f in spread(eligible, n)]
    return Split("variants", tuple(held), tuple(t for t in sorted(families) if t not in held))


def families_split(families: dict[str, str | None], n: int, members_per_family: int | None = 3,
                   learnable: set[str] | None = None) -> Split:
    """``n`` whole families held out (spread over families with at least 2 bench tasks); up to
    ``members_per_family`` of each evaluated (with ``learnable``: among its learnable members, and
    only families that have one are held out)."""
    members = _members(families)
    eligible = [f for f in sorted(members) if len(members[f]) >= 2]
    if len(eligible) < 2:
        raise ValueError("the families protocol needs at least 2 families with 2 or more harvested tasks")
    candidates = [f for f in eligible if _candidates(members[f], learnable)] or eligible
    held_families = spread(candidates, min(n, len(eligible) - 1))  # at least one family stays for training
    held = [t for f in held_families for t in spread(_candidates(members[f], learnable) or members[f],
                                                     members_per_family)]
    training = [t for t in sorted(families) if families[t] not in held_families]
    return Split("families", tuple(held), tuple(training), tuple(held_families))


def custom_split(tasks: list[str], held_out: list[str]) -> Split:
    return Split("custom", tuple(held_out), tuple(t for t in sorted(tasks) if t not in held_out))
