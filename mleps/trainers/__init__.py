"""Update rules. Each turns a batch into a parameter update plus raw statistics.

Adding a rule: one module here with a `UpdateRule` subclass, its name in RULES, a schema
in mleps/config.py and a conf/trainer/<name>.yaml.
"""
from __future__ import annotations

import importlib

from mleps.errors import UserError

RULES = {
    "mle": "mleps.trainers.mle:MLE",
    "mgs": "mleps.trainers.mgs:MGS",
    "pg": "mleps.trainers.pg:PolicyGradient",
    "mrt": "mleps.trainers.mrt:MinimumRiskTraining",
}


def build_rule(name: str, **kwargs):
    if name not in RULES:
        raise UserError(f"unknown trainer '{name}': use one of {', '.join(RULES)}")
    module, cls = RULES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
