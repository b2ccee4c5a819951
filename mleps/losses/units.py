"""Words or characters: the unit edit distance and the length ratio count in."""
from __future__ import annotations

from dataclasses import dataclass

from mleps.choice import Choice


class Unit(Choice):
    word = "word"  # whitespace-split
    char = "char"


UNITS = tuple(m.value for m in Unit)


@dataclass
class UnitOptions:
    unit: Unit = Unit.word  # edit, length: word | char


def _units(text: str, unit: str):
    return text.split() if unit == "word" else text


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
    return unit
