"""Words or characters: the unit edit distance and the length ratio count in."""
from __future__ import annotations

from dataclasses import dataclass

UNITS = ("word", "char")


@dataclass
class UnitOptions:
    unit: str = "word"  # edit, length: word | char


def _units(text: str, unit: str):
    return text.split() if unit == "word" else text


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose one of: {', '.join(UNITS)}")
    return unit
