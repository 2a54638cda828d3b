"""The model zoo: cards in `models/` (TOML, one per model), read and looked up by name.

Cards are data: what a model is and how to run it. Where its weights are found is
`shortv.store` (the local weight store, then `shortv.hub`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from . import families
from .errors import ConfigError, ModelNotFoundError, ShortVError
from .family import Family

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# An editable install or a checkout runs from the source tree; a wheel sits in site-packages,
# whose parent folder is shared with other packages (a foreign models/ must not be read).
IN_SOURCE_TREE = (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "models").is_dir()


def cards_dirs() -> list[Path]:
    """Where cards are looked for: the source tree's models/, then the wheel's copy."""
    dirs = [REPO_DIR / "models"] if IN_SOURCE_TREE else []
    return [d for d in (*dirs, PACKAGE_DIR / "_data" / "models") if d.is_dir()]


@dataclass(frozen=True)
class Card:
    """One zoo model: where its weights come from, how to run it, how to freeze it.

    family: the model family (`shortv.families`) whose config `config` is, and which
    must read the model's checkpoint."""

    name: str
    family: str
    description: str
    template: str
    config: Any
    repo: str | None = None
    alternates: tuple[str, ...] = ()
    vision_tower: str | None = None
    ranking: tuple[int, ...] = ()
    n_frozen: int | None = None
    ranking_source: str = ""
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def from_toml(cls, path: Path) -> Card:
        try:
            data = tomllib.loads(path.read_text())
            return cls.from_dict(data, path)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read zoo card {path}: {e}") from None
        except ShortVError:  # already says what is wrong (a ConfigError is a ValueError too)
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"zoo card {path} is malformed: {e!r}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Card:
        """A card from its TOML tables; ConfigError when the family or the template is
        missing or unknown, or the ranking does not fit the decoder (ids out of range or
        repeated, n_frozen beyond it)."""
        source = d.get("source", {})
        shortv = d.get("shortv", {})
        family = _family(d, path)
        card = cls(
            name=d["name"],
            family=family.name,
            description=d.get("description", ""),
            template=d["template"],  # every card names its own: the texts differ by a word
            config=family.card_config(d["architecture"], d.get("preprocess", {})),
            repo=source.get("repo"),
            alternates=tuple(source.get("alternates", ())),
            vision_tower=source.get("vision_tower"),
            ranking=tuple(int(i) for i in shortv.get("ranking", ())),
            n_frozen=shortv.get("n_frozen"),
            ranking_source=shortv.get("source", ""),
            path=path,
        )
        card._check()
        return card

    def _check(self) -> None:
        from .conversation import get_template

        get_template(self.template)
        layers = self.config.text.layers
        if len(set(self.ranking)) != len(self.ranking) or not all(
                0 <= i < layers for i in self.ranking):
            raise ConfigError(f"card {self.name!r}: its ranking must list distinct layer ids "
                              f"of its {layers} layers, got {list(self.ranking)}")
        if self.n_frozen is not None and not 0 <= self.n_frozen <= len(self.ranking):
            raise ConfigError(f"card {self.name!r}: n_frozen={self.n_frozen} but its ranking "
                              f"lists {len(self.ranking)} layers")

    @property
    def ranking_origin(self) -> str:
        """Where the card's frozen-layer ranking comes from: "paper" (the ShortV paper's),
        "shortv lc" (computed with `shortv lc`), or "none" (compute one with `shortv lc`)."""
        if not self.ranking:
            return "none"
        return "paper" if "paper" in self.ranking_source.lower() else "shortv lc"

    def summary(self) -> dict[str, Any]:
        """What the card says, as `shortv zoo --json` prints it (beside where its weights are)."""
        c = self.config
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "repo": self.repo,
            "alternates": list(self.alternates),
            "vision_tower": self.vision_tower,
            "layers": c.text.layers,
            "hidden_size": c.text.hidden_size,
            "heads": c.text.heads,
            "kv_heads": c.text.kv_heads,
            "image_aspect_ratio": c.image_aspect_ratio,
            "template": self.template,
            "n_frozen": self.n_frozen,
            "ranking": list(self.ranking),
            "ranking_origin": self.ranking_origin,
            "ranking_source": self.ranking_source,
        }


def _family(d: dict[str, Any], path: Path | None) -> Family:
    """The family a card's top-level `family` names; ConfigError when it names none or an
    unknown one."""
    where = f"zoo card {path}" if path is not None else f"zoo card {d.get('name')!r}"
    if "family" not in d:
        raise ConfigError(f"{where} names no model family; add a top-level line "
                          f"family = \"...\", one of: {', '.join(families.names())}")
    try:
        return families.get(d["family"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


@cache
def _cards() -> dict[str, Card]:
    cards: dict[str, Card] = {}
    for d in cards_dirs():
        for path in sorted(d.glob("*.toml")):
            card = Card.from_toml(path)
            cards.setdefault(card.name, card)
    return cards


def cards() -> list[Card]:
    """Every zoo card, sorted by name."""
    return sorted(_cards().values(), key=lambda c: c.name)


def names() -> list[str]:
    """Every zoo name, in the order the cards were found (for messages listing them)."""
    return list(_cards())


def card(name: str) -> Card | None:
    """The zoo card of that name, or None."""
    return _cards().get(name)


def get_card(name: str) -> Card:
    """The zoo card of that name; ModelNotFoundError listing the zoo's names."""
    found = card(name)
    if found is None:
        raise ModelNotFoundError(
            f"{name!r} is not a zoo model; `shortv zoo` lists them: {', '.join(names())}"
        )
    return found
