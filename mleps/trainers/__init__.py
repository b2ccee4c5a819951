"""Update rules. Each turns a batch into a parameter update plus raw statistics.

Adding a rule: one module with an `UpdateRule` subclass that owns its config schema (a
`TrainerConfig` subclass) and is decorated with `@register_rule`, imported below (or by the
user's code before mleps.config.register_configs runs), and a conf/trainer/<name>.yaml whose
defaults list starts with `<name>_schema`. The loop reads only the rule's declared needs
(mleps.trainers.base.UpdateRule), never its name.
"""
from __future__ import annotations

from mleps.errors import UserError
from mleps.trainers import mle, mgs, pg, mrt  # noqa: F401,I001  (the built-in rules register themselves, in this order)
from mleps.trainers.base import RULES, UpdateRule, register_rule

__all__ = ["RULES", "UpdateRule", "register_rule", "rule_class", "build_rule"]


def rule_class(name: str) -> type[UpdateRule]:
    if name not in RULES:
        raise UserError(f"unknown trainer '{name}': use one of {', '.join(RULES)}")
    return RULES[name]


def build_rule(name: str, **kwargs) -> UpdateRule:
    return rule_class(name)(**kwargs)
