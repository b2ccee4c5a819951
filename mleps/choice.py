"""`Choice`: a knob's allowed values as an Enum (framework-free; mleps.search and the config schemas use it).

A member equals, hashes and prints as its string, so a structured config typed with it checks and documents
itself (`trainer.proposal=best` fails at start with Hydra's one line naming the key and the choices), the
code compares it with plain strings, and a plain Python caller may pass the string.
"""
from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, knob: str, value) -> "Choice":
        """`value` as a member; ValueError naming the knob and the allowed values (one line)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{knob} must be one of {tuple(m.value for m in cls)}, got {value!r}") from None
