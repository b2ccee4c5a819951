"""Update rules. Each turns a batch into a parameter update plus raw statistics.

Adding a rule: one module here (found on import; or in the user's code, imported before
mleps.config.register_configs runs) with an `UpdateRule` subclass that owns its config schema
(a `TrainerConfig` subclass) and is decorated with `@register_rule`, and a
mleps/conf/trainer/<name>.yaml whose defaults list starts with `<name>_schema`. The loop reads only the rule's declared needs
(mleps.trainers.base.UpdateRule), never its name.
"""
from __future__ import annotations

import importlib
import pkgutil

from mleps.errors import UserError
from mleps.trainers.base import RULES, UpdateRule, register_rule

# Every module of this package registers its rules on import (a new rule needs no line here); the
# usual order first, for messages that list the rules.
for _module in ("mle", "mgs", "pg", "mrt", *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["RULES", "UpdateRule", "register_rule", "rule_class", "build_rule"]


def rule_class(name: str) -> type[UpdateRule]:
    if name not in RULES:
        raise UserError(f"unknown trainer '{name}': use one of {', '.join(RULES)}")
    return RULES[name]


def build_rule(name: str, **kwargs) -> UpdateRule:
    return rule_class(name)(**kwargs)
