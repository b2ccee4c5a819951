"""Update rules. Each turns a batch into a parameter update plus raw statistics.

Adding a rule: one module here with an `UpdateRule` subclass, one entry in RULES (its class
and its config schema from mleps.config; the schema is registered with Hydra from this
table), and a conf/trainer/<name>.yaml.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from mleps.config import MGSConfig, MLEConfig, MRTConfig, PGConfig
from mleps.errors import UserError


@dataclass(frozen=True)
class Rule:
    path: str  # "module:Class" of the UpdateRule, imported when first used
    schema: type  # the trainer config dataclass

    def load(self):
        module, cls = self.path.split(":")
        return getattr(importlib.import_module(module), cls)


RULES = {
    "mle": Rule("mleps.trainers.mle:MLE", MLEConfig),
    "mgs": Rule("mleps.trainers.mgs:MGS", MGSConfig),
    "pg": Rule("mleps.trainers.pg:PolicyGradient", PGConfig),
    "mrt": Rule("mleps.trainers.mrt:MinimumRiskTraining", MRTConfig),
}


def rule_class(name: str):
    if name not in RULES:
        raise UserError(f"unknown trainer '{name}': use one of {', '.join(RULES)}")
    return RULES[name].load()


def build_rule(name: str, **kwargs):
    return rule_class(name)(**kwargs)
