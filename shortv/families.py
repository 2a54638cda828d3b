"""The registered model families, looked up by name (zoo cards) or from a config.json.

A family is added by writing its modules and one `register(...)` call at the bottom of
this file; the loader, the zoo and everything above them never name a family.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .family import Family
from .llava_family import LLAVA
from .qwen_family import QWEN

_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    """Add a family. Its name and model_types must be new: one config.json, one family."""
    if family.name in _FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    for other in _FAMILIES.values():
        shared = set(family.model_types) & set(other.model_types)
        if shared:
            raise ValueError(f"family {family.name!r} claims model_type {sorted(shared)}, "
                             f"which family {other.name!r} already reads")
    _FAMILIES[family.name] = family


def names() -> list[str]:
    """The registered families' names, in registration order."""
    return list(_FAMILIES)


def get(name: str) -> Family:
    """The family of that name (as zoo cards give it); ConfigError naming the known ones."""
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def of_config_json(raw: dict[str, Any], where: str = "config.json") -> Family:
    """The family a checkpoint's config.json (`raw`, read from `where`) belongs to: by its
    model_type, else by its architectures. ConfigError, one line, listing the model_types
    shortv reads when no family claims it."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{where}'s model_type={model_type!r:.60} is not a string")
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"{where}'s architectures={architectures!r:.60} is not a list of names")
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    for family in _FAMILIES.values():
        if any(a in family.architectures for a in architectures):
            return family
    said = [f"model_type {model_type!r}"] if model_type else ["no model_type"]
    said += [f"architectures {architectures}"] if architectures else []
    titles = " or ".join(f.title for f in _FAMILIES.values())
    known = ", ".join(t for f in _FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"{where} has {' and '.join(said)}: not a {titles} model; shortv reads "
                      f"model_type {known}")


register(LLAVA)
register(QWEN)
