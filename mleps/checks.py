"""Range checks shared by mleps.validate and the model sources (mleps.models): one-line UserErrors
naming the key and the fix."""
from __future__ import annotations

import math

from mleps.errors import UserError


def _at_least(value, low: int, key: str) -> None:
    if value is not None and value < low:
        raise UserError(f"{key}={value}: use {low} or more")


def _finite(value, key: str, low: float = float("-inf"), strict: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        bound = "" if low == float("-inf") else f" {'>' if strict else '>='} {low:g}"
        raise UserError(f"{key}={value}: use a finite number{bound}")


def _divisor(n: int, near: int) -> int:
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: abs(k - near))
