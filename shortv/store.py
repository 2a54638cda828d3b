"""The local weight store, and where a model's weights are found (`locate`) or put (`download`).

A source resolves to a directory in this order: an existing directory, the local weight store
(`weights/<name>/`, or $SHORTV_WEIGHTS, or the per-user store of a wheel), then the Hugging Face
cache / Hub (`shortv.hub`). Sources that are not zoo names (`shortv.zoo`) are local directories
or Hub repo ids. `download` (behind `shortv download NAME`) fills the store ahead of time.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import hub
from .errors import ConfigError, ModelNotFoundError, require_model_name
from .zoo import IN_SOURCE_TREE, PACKAGE_DIR, REPO_DIR, card, names


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


def store_looked(label: str) -> str:
    """Where the weight store was searched for `label`, for messages."""
    looked = ", ".join(str(d / store_name(label)) for d in weights_dirs())
    if not looked:
        looked = f"no store exists: {download_dir()} is missing and $SHORTV_WEIGHTS is not set"
    elif os.environ.get("SHORTV_WEIGHTS") and not Path(os.environ["SHORTV_WEIGHTS"]).expanduser().is_dir():
        looked += f"; $SHORTV_WEIGHTS={os.environ['SHORTV_WEIGHTS']} is not a directory"
    return looked


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


def looks_like_repo(source: str) -> bool:
    """Whether `source` has the shape of a Hub repo id, `owner/name` (and is not a path)."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not looks_like_path(source)


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
    if repo is None or not looks_like_repo(repo):
        what = ("a zoo model whose weights ship with shortv, but they are missing"
                if zoo_card is not None else "not a zoo name, not a directory and not a Hub repo id")
        raise ModelNotFoundError(
            f"cannot find model {source!r}: {what}; not in the weight store ({store_looked(source)}); "
            "`shortv zoo` lists the zoo names"
        )
    return hub.hub_snapshot(repo, label=source, searched=f"the weight store ({store_looked(source)})")


# ---- downloading into the weight store ------------------------------------------------------


def download_plan(source: str, to: Path | str | None = None, *, alternate: bool = False
                  ) -> list[tuple[str, Path]]:
    """What `download(source, to)` fetches, as (Hub repo, target directory) pairs: the model first,
    then, for an original LLaVA-1.5 checkpoint (which carries no vision tower), its CLIP tower.

    Checks the arguments without touching the network or the disk: ModelNotFoundError for a source
    that is neither a zoo name nor a Hub repo id, ConfigError for an empty one, a zoo model without
    a Hub source (the demo), an `alternate` it lacks, or a `to` that is not a directory.
    """
    require_model_name(source, accepted="a zoo name (`shortv zoo` lists them) or a Hub repo id")
    store = Path(to).expanduser() if to is not None else download_dir()
    if store.exists() and not store.is_dir():
        raise ConfigError(f"cannot download into {store}: it is not a directory")
    zoo_card = card(source)
    if zoo_card is None:
        if not looks_like_repo(source):
            what = "a path" if looks_like_path(source) else "not a zoo name nor a Hub repo id (owner/name)"
            raise ModelNotFoundError(
                f"cannot download {source!r}: {what}; `shortv download` takes a zoo name "
                f"(`shortv zoo` lists them: {', '.join(names())}) or a Hub repo id")
        if alternate:
            raise ConfigError(f"cannot download {source!r} --alternate: only zoo models have alternates")
        return [(source, store / store_name(source))]
    if alternate and not zoo_card.alternates:
        raise ConfigError(f"{zoo_card.name} has no alternate Hub repo")
    repo = zoo_card.alternates[0] if alternate else zoo_card.repo
    if repo is None:
        raise ConfigError(f"{zoo_card.name} has no Hub source: it ships with shortv, weights included")
    plan = [(repo, store / store_name(zoo_card.name))]
    # Original LLaVA-1.5 checkpoints name their tower (mm_vision_tower) instead of carrying it;
    # LLaVA-NeXT's and the transformers-layout alternates have it inside.
    if zoo_card.vision_tower and not alternate and zoo_card.config.image_aspect_ratio != "anyres":
        plan.append((zoo_card.vision_tower, store / store_name(zoo_card.vision_tower)))
    return plan


def download(source: str, to: Path | str | None = None, *, alternate: bool = False,
             progress: bool = True) -> Path:
    """Download a zoo model (or any Hub repo id) into the weight store and return its directory.

    The store is `to`, else $SHORTV_WEIGHTS, else the source tree's weights/ (installed from a
    wheel: the per-user store, ~/.cache/shortv/weights); the model lands in
    `<store>/<name>/` (repo ids as owner--name) and, for a v1.5 card, the CLIP tower it needs in
    `<store>/openai--clip-vit-large-patch14-336/`, where loading finds both. Only the files shortv
    needs are fetched, resumably, with huggingface_hub's progress bars unless `progress` is False.
    Offline or without the Hub, a copy already in the HF cache is linked into the store instead.

    Raises (all ShortVError): the argument errors of `download_plan`; ModelNotFoundError when the
    files cannot be had (Hub unreachable or offline and nothing cached, no such repo, gated);
    CheckpointError when they cannot be written.
    """
    plan = download_plan(source, to, alternate=alternate)
    label = source
    with hub.progress_bars(progress):
        for repo, target in plan:
            hub.hub_snapshot(repo, local_dir=target, label=label)
            label = repo  # the tower: `shortv download <tower repo>` fetches it alone
    return plan[0][1]
