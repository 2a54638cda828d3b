"""The model zoo: cards in `models/` (TOML, one per model) and where weights are found.

A zoo name resolves to weights in this order: the local weight store (`weights/<name>/`),
then the Hugging Face cache / Hub (`shortv.hub`). Sources that are not zoo names are local
directories or Hub repo ids.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .config import LLAVA_NEXT_PINPOINTS, LlavaConfig, TextConfig, VisionConfig
from .errors import ConfigError, ModelNotFoundError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# An editable install or a checkout runs from the source tree; a wheel sits in site-packages,
# whose parent folder is shared with other packages (a foreign models/ must not be read).
IN_SOURCE_TREE = (REPO_DIR / "pyproject.toml").is_file() and (REPO_DIR / "models").is_dir()


def cards_dirs() -> list[Path]:
    """Where cards are looked for: the source tree's models/, then the wheel's copy."""
    dirs = [REPO_DIR / "models"] if IN_SOURCE_TREE else []
    return [d for d in (*dirs, PACKAGE_DIR / "_data" / "models") if d.is_dir()]


def user_weights_dir() -> Path:
    """The per-user weight store of an installed wheel: $XDG_CACHE_HOME/shortv/weights
    (~/.cache/shortv/weights)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "shortv" / "weights"


def weights_dirs() -> list[Path]:
    """The local weight store, in search order: $SHORTV_WEIGHTS, then the source tree's
    weights/ (or, installed from a wheel, the per-user store), then the wheel's own copy
    of the embedded demo."""
    dirs = []
    if os.environ.get("SHORTV_WEIGHTS"):
        dirs.append(Path(os.environ["SHORTV_WEIGHTS"]).expanduser())
    dirs += [REPO_DIR / "weights" if IN_SOURCE_TREE else user_weights_dir(),
             PACKAGE_DIR / "_data" / "weights"]
    return [d for d in dirs if d.is_dir()]


def download_dir() -> Path:
    """Where `download` puts weights by default: $SHORTV_WEIGHTS, else the source tree's
    weights/, else (installed from a wheel) the per-user store."""
    if os.environ.get("SHORTV_WEIGHTS"):
        return Path(os.environ["SHORTV_WEIGHTS"]).expanduser()
    return REPO_DIR / "weights" if IN_SOURCE_TREE else user_weights_dir()


@dataclass(frozen=True)
class Card:
    """One zoo model: where its weights come from, how to run it, how to freeze it."""

    name: str
    description: str
    template: str
    config: LlavaConfig
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
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"zoo card {path} is malformed: {e!r}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Card:
        """A card from its TOML tables; ConfigError when the template is unknown or the
        ranking does not fit the decoder (ids out of range or repeated, n_frozen beyond it)."""
        source = d.get("source", {})
        shortv = d.get("shortv", {})
        card = cls(
            name=d["name"],
            description=d.get("description", ""),
            template=d["template"],  # every card names its own: the texts differ by a word
            config=_architecture(d["architecture"], d.get("preprocess", {})),
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
        """What `shortv zoo --json` prints for this card."""
        c = self.config
        return {
            "name": self.name,
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
            "local_weights": str(p) if (p := local_weights(self.name)) else None,
        }


def _architecture(arch: dict[str, Any], pre: dict[str, Any]) -> LlavaConfig:
    pinpoints = tuple(tuple(p) for p in pre.get("grid_pinpoints", ()))
    if pre.get("image_aspect_ratio") == "anyres" and not pinpoints:
        pinpoints = LLAVA_NEXT_PINPOINTS
    return LlavaConfig(
        vision=VisionConfig(**arch.get("vision", {})),
        text=TextConfig(**arch.get("text", {})),
        projector=arch.get("projector", "mlp2x_gelu"),
        vision_select_layers=tuple(arch.get("select_layers", (-2,))),
        vision_select_feature=arch.get("select_feature", "patch"),
        image_aspect_ratio=pre.get("image_aspect_ratio", "pad"),
        image_grid_pinpoints=pinpoints,  # type: ignore[arg-type]
        patch_merge_type=pre.get("patch_merge_type", "flat"),
    )


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


def card(name: str) -> Card | None:
    """The zoo card of that name, or None."""
    return _cards().get(name)


def get_card(name: str) -> Card:
    """The zoo card of that name; ModelNotFoundError listing the zoo's names."""
    found = card(name)
    if found is None:
        raise ModelNotFoundError(
            f"{name!r} is not a zoo model; `shortv zoo` lists them: {', '.join(_cards())}"
        )
    return found


def store_name(source: str) -> str:
    """Directory name in the weight store: zoo names as is, repo ids with '/' → '--'."""
    return source.replace("/", "--")


def local_weights(source: str) -> Path | None:
    """The weight store's directory for a zoo name or repo id, if present."""
    for d in weights_dirs():
        candidate = d / store_name(source)
        if (candidate / "config.json").is_file():
            return candidate
    return None


def looks_like_path(source: str) -> bool:
    """Whether `source` can only be meant as a filesystem path, not a zoo name or an `owner/name`
    Hub id: it starts with ./ ../ / or ~, ends with a separator, has a drive, or holds more
    separators than a single owner/name does."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    posix = source
    for sep in seps:
        posix = posix.replace(sep, "/")
    return (
        posix in {".", "..", "~"}
        or posix.startswith(("./", "../", "/", "~"))
        or posix.endswith("/")
        or posix.count("/") > 1
        or (os.sep != "/" and os.sep in source)  # Windows: a backslash is never part of a repo id
        or bool(Path(source).drive)
    )


def _looks_like_repo(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not looks_like_path(s)


def locate(source: str, *, relative_to: Path | None = None) -> Path:
    """A directory holding `source`: an existing path (also relative to `relative_to`), the weight
    store, the HF cache, or a fresh Hub download, in that order.

    With `relative_to` (a checkpoint naming its vision tower), a store-named directory beside that
    checkpoint also counts, so that `download(NAME, to=DIR)` leaves a self-contained DIR.
    Raises ModelNotFoundError with one line saying where it looked and what to do.
    """
    path = Path(os.path.expanduser(source))  # Path.expanduser raises on an unknown ~user
    candidates = [path]
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if looks_like_path(source):
        # Only a path was meant: the weight store and the Hub have nothing to say about it.
        what = "not a directory" if any(c.exists() for c in candidates) else "no such directory"
        absolute = os.path.abspath(path)
        shown = [source if absolute == source else f"{source} ({absolute})", *map(str, candidates[1:])]
        raise ModelNotFoundError(f"cannot find model {source!r}: {what}: {' nor '.join(shown)}")
    if relative_to is not None:
        beside = relative_to.parent / store_name(source)
        if (beside / "config.json").is_file():
            return beside
    found = local_weights(source)
    if found:
        return found
    zoo_card = card(source)
    repo = zoo_card.repo if zoo_card is not None else source
    if repo is None or not _looks_like_repo(repo):
        what = ("a zoo model whose weights ship with shortv, but they are missing"
                if zoo_card is not None else "not a zoo name, not a directory and not a Hub repo id")
        raise ModelNotFoundError(
            f"cannot find model {source!r}: {what}; not in the weight store ({_store_looked(source)}); "
            "`shortv zoo` lists the zoo names"
        )
    from .hub import hub_snapshot  # the Hub module builds on this one

    return hub_snapshot(repo, label=source)


def _store_looked(label: str) -> str:
    """Where the weight store was searched for `label`, for messages."""
    looked = ", ".join(str(d / store_name(label)) for d in weights_dirs())
    if not looked:
        looked = f"no store exists: {download_dir()} is missing and $SHORTV_WEIGHTS is not set"
    elif os.environ.get("SHORTV_WEIGHTS") and not Path(os.environ["SHORTV_WEIGHTS"]).expanduser().is_dir():
        looked += f"; $SHORTV_WEIGHTS={os.environ['SHORTV_WEIGHTS']} is not a directory"
    return looked
