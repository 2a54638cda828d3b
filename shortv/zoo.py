"""The model zoo: cards in `models/` (TOML, one per model) and where weights are found.

A zoo name resolves to weights in this order: the local weight store (`weights/<name>/`),
then the Hugging Face cache / Hub (only the files needed, resumable, with progress bars;
HF_HUB_OFFLINE and the HF cache variables are honoured). Sources that are not zoo names
are local directories or Hub repo ids.
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


def cards_dirs() -> list[Path]:
    """Where cards are looked for: the source tree's models/, then the wheel's copy."""
    return [d for d in (REPO_DIR / "models", PACKAGE_DIR / "_data" / "models") if d.is_dir()]


def weights_dirs() -> list[Path]:
    """The local weight store: $SHORTV_WEIGHTS, the source tree's weights/, the wheel's copy."""
    dirs = []
    if os.environ.get("SHORTV_WEIGHTS"):
        dirs.append(Path(os.environ["SHORTV_WEIGHTS"]).expanduser())
    dirs += [REPO_DIR / "weights", PACKAGE_DIR / "_data" / "weights"]
    return [d for d in dirs if d.is_dir()]


def download_dir() -> Path:
    """Where scripts/download.py puts weights: $SHORTV_WEIGHTS or the source tree's weights/."""
    if os.environ.get("SHORTV_WEIGHTS"):
        return Path(os.environ["SHORTV_WEIGHTS"]).expanduser()
    return REPO_DIR / "weights"


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
        source = d.get("source", {})
        shortv = d.get("shortv", {})
        return cls(
            name=d["name"],
            description=d.get("description", ""),
            template=d.get("template", "vicuna_v1"),
            config=_architecture(d["architecture"], d.get("preprocess", {})),
            repo=source.get("repo"),
            alternates=tuple(source.get("alternates", ())),
            vision_tower=source.get("vision_tower"),
            ranking=tuple(int(i) for i in shortv.get("ranking", ())),
            n_frozen=shortv.get("n_frozen"),
            ranking_source=shortv.get("source", ""),
            path=path,
        )

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
            "image_aspect_ratio": c.image_aspect_ratio,
            "template": self.template,
            "n_frozen": self.n_frozen,
            "ranking": list(self.ranking),
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
    return _cards().get(name)


def get_card(name: str) -> Card:
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


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def locate(source: str, *, relative_to: Path | None = None) -> Path:
    """A directory holding `source`: an existing path (also relative to `relative_to`),
    the weight store, the HF cache, or a fresh Hub download, in that order."""
    for candidate in (Path(source).expanduser(),
                      *([relative_to / source] if relative_to is not None else [])):
        if candidate.is_dir():
            return candidate
    zoo_card = card(source)
    found = local_weights(source)
    if found:
        return found
    repo = zoo_card.repo if zoo_card is not None else source
    if repo is None or not _looks_like_repo(repo):
        looked = ", ".join(str(d / store_name(source)) for d in weights_dirs()) or "weights/"
        raise ModelNotFoundError(
            f"cannot find model {source!r}: not a directory, not in the weight store ({looked}), "
            "and not a Hub repo id; `shortv zoo` lists the zoo names"
        )
    return hub_snapshot(repo, label=source)


def _looks_like_repo(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~"))


def hub_snapshot(repo: str, *, local_dir: Path | None = None, label: str | None = None) -> Path:
    """The files of a Hub repo that shortv needs (configs, tokenizer, one weight format),
    from the HF cache or downloaded (resumable, with progress bars)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    label = label or repo
    offline = hub_offline()
    try:
        if offline:
            return Path(snapshot_download(repo, local_files_only=True, local_dir=local_dir))
        patterns = ["*.json", "tokenizer.model", *_weight_patterns(repo)]
        return Path(snapshot_download(repo, allow_patterns=patterns, local_dir=local_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        where = ", ".join(str(d / store_name(label)) for d in weights_dirs()) or "weights/"
        how = (
            f"download it with `python scripts/download.py {label}` on a machine with network"
            if offline else "check the name and your network, or download it with scripts/download.py"
        )
        mode = "offline (HF_HUB_OFFLINE is set)" if offline else "from the Hugging Face Hub"
        raise ModelNotFoundError(
            f"cannot get {label!r} {mode}: looked in {where} and the Hugging Face cache for "
            f"{repo}; {how} ({e.__class__.__name__})"
        ) from None


def _weight_patterns(repo: str) -> list[str]:
    """Safetensors when the repo has them, else .bin (with their index files)."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo)
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return ["*.bin"]
