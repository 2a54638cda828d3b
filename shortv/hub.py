"""The Hugging Face cache and Hub: the files shortv needs from a repo, fetched or found.

`shortv.store` asks here for what its weight store lacks, and fills the store from here
(`shortv.store.download`, behind `shortv download NAME`).

Only the files needed are fetched (configs, tokenizer, one weight format), resumable, with
progress bars; HF_HUB_OFFLINE, HF_ENDPOINT and the HF cache variables are honoured, as
huggingface_hub reads them. Every failure is one ShortVError line, chosen by exception type;
an unreachable Hub fails in one request, not after a minute of retries.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, ModelNotFoundError, ShortVError


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is on, exactly as huggingface_hub sees it.

    Asked at call time rather than cached: huggingface_hub parses the environment once, at import,
    and a program (or a test) that switches modes later does so by patching its constants."""
    from huggingface_hub import constants

    is_offline_mode = getattr(constants, "is_offline_mode", None)  # newer huggingface_hub only
    return bool(is_offline_mode() if is_offline_mode is not None else constants.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache in use (HF_HUB_CACHE / HF_HOME, as huggingface_hub resolved them)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_endpoint() -> str:
    """The Hub's address in use (HF_ENDPOINT or huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the Hub could not be reached".

    huggingface_hub lets its HTTP client's transport errors through as they are, and those are not
    OSErrors (httpx, httpx2); which client it uses depends on its version (requests in 0.x, httpx
    or httpx2 later), so take the types from whichever of them is loaded: the hub imports its
    client together with `huggingface_hub.utils`.
    """
    from huggingface_hub.utils import OfflineModeIsEnabled

    found: list[type[BaseException]] = [OfflineModeIsEnabled]
    for name in ("httpx2", "httpx"):
        if (module := sys.modules.get(name)) is not None and hasattr(module, "TransportError"):
            found.append(module.TransportError)
    if (requests := sys.modules.get("requests")) is not None:
        found += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(found)


Patterns = tuple[list[str], list[str]]  # (allow_patterns, ignore_patterns) for snapshot_download


def _needed(files: list[str]) -> Patterns:
    """What shortv needs from a repo with these files: configs, the SentencePiece model, and one
    weight format: safetensors when there are any, else .bin.

    The other format's index is left out too, since the loader reads whichever index it finds; so
    is training_args.bin, LLaVA's pickled Trainer arguments, which a directory of unindexed .bin
    files would otherwise load as weights.
    """
    if any(f.endswith(".safetensors") for f in files):
        return ["*.json", "tokenizer.model", "*.safetensors"], ["*.bin.index.json"]
    return ["*.json", "tokenizer.model", "*.bin"], ["*.safetensors.index.json", "training_args.bin"]


def _matches(name: str, patterns: Patterns) -> bool:
    allow, ignore = patterns
    return (any(fnmatch.fnmatch(name, p) for p in allow)
            and not any(fnmatch.fnmatch(name, p) for p in ignore))


def _hub_files(repo: str) -> list[str]:
    """The repo's file names, from one metadata request.

    Not `list_repo_files`: that pages through `http_backoff`, which retries an unreachable Hub
    five times over ~25 s before giving up. `model_info` makes a single request, bounded by the
    hub's own metadata timeout (HF_HUB_ETAG_TIMEOUT, 10 s by default); the Hub answering at all is
    what this call finds out, and real downloads keep their retries inside snapshot_download.
    """
    from huggingface_hub import HfApi, constants

    info = HfApi().model_info(repo, timeout=float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)))
    if info.siblings is None:  # not expected from the Hub, but then ask for the listing itself
        return list(HfApi().list_repo_files(repo))
    return [s.rfilename for s in info.siblings]


def _cached_files(repo: str, local_dir: Path | None) -> list[str] | None:
    """The repo's file names as last listed by the Hub, from the cache (no network): newer
    huggingface_hub versions keep the listing and refuse a cached snapshot that misses any file
    it names, so the offline lookup must ask for the same files the download fetched."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # an older huggingface_hub: no listing kept, nothing to match
        return None
    try:
        tree = get_cached_repo_tree(repo, cache_dir=hf_cache_dir(), local_dir=local_dir)
    except CachedRepoTreeNotFoundError:
        return None
    return [f.path for f in tree]


def hub_snapshot(repo: str, *, local_dir: Path | None = None, label: str | None = None,
                 searched: str | None = None) -> Path:
    """The files of a Hub repo that shortv needs (configs, tokenizer, one weight format), from the
    HF cache or downloaded (resumable, with progress bars), into `local_dir` when given.

    `label` is the name the user asked for (default: the repo); `searched` says where the caller
    looked before the HF cache (the weight store, say), for the message when nothing is found.

    Offline (HF_HUB_OFFLINE), or when the Hub cannot be reached, only local copies count: the HF
    cache, or `local_dir` itself. Every failure is a one-line ShortVError: ModelNotFoundError when
    the files are not to be had, CheckpointError when they cannot be written.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    label = label or repo
    try:
        if hub_offline():
            return _from_cache(repo, local_dir)
        try:
            allow, ignore = _needed(_hub_files(repo))
        except (*_unreachable_errors(), HfHubHTTPError) as e:
            if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
                raise  # the Hub answered: there is no such repo, whatever the cache holds
            failure: BaseException = e  # unreachable or failing (5xx, 429): a cached copy will do
        else:
            return Path(snapshot_download(repo, allow_patterns=allow, ignore_patterns=ignore,
                                          local_dir=local_dir, cache_dir=hf_cache_dir()))
        try:
            return _from_cache(repo, local_dir)
        except Exception as e:
            if _is_incomplete(e) or not isinstance(e, _local_entry_error()):
                raise
            raise failure from None  # nothing cached: the Hub's failure is what to report
    except Exception as e:
        error = _explain(e, repo=repo, label=label, local_dir=local_dir, searched=searched)
        if error is None:
            raise
        raise error from None


def _from_cache(repo: str, local_dir: Path | None) -> Path:
    """The repo's needed files from local copies only: `local_dir` if it already holds them, else
    the HF cache's snapshot (hard-linked or copied into `local_dir` when one is asked for)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    def patterns(where: Path | None) -> dict[str, list[str] | None]:
        files = _cached_files(repo, where)
        allow, ignore = _needed(files) if files is not None else (None, None)
        return {"allow_patterns": allow, "ignore_patterns": ignore}

    if local_dir is not None and local_dir.is_dir():
        try:
            return Path(snapshot_download(repo, local_files_only=True, local_dir=local_dir,
                                          cache_dir=hf_cache_dir(), **patterns(local_dir)))
        except LocalEntryNotFoundError as e:
            if _is_incomplete(e):  # a half-finished download there: the cache cannot tell what it lacks
                raise
    snapshot = Path(snapshot_download(repo, local_files_only=True, cache_dir=hf_cache_dir(),
                                      **patterns(None)))
    if local_dir is None:
        return snapshot
    _link_tree(snapshot, local_dir)
    return local_dir


def _link_tree(snapshot: Path, target: Path) -> None:
    """Put the needed files of a cached snapshot into `target`: hard links to the cache's blobs
    (no second copy of many GB) where the filesystem allows, copies elsewhere."""
    files = sorted(name for p in snapshot.rglob("*")
                   if p.is_file() and not (name := p.relative_to(snapshot).as_posix()).startswith(".cache/"))
    wanted = _needed(files)
    for name in files:
        if not _matches(name, wanted):
            continue
        source, dest = (snapshot / name).resolve(), target / name
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(source, dest)


def _is_incomplete(e: BaseException) -> bool:
    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:
        return False
    return isinstance(e, IncompleteSnapshotError)


def _explain(e: BaseException, *, repo: str, label: str, local_dir: Path | None,
             searched: str | None) -> ShortVError | None:
    """The ShortVError to raise for a huggingface_hub failure, chosen by the exception's type (and
    the type of what caused it); None for anything that is not a known way of failing."""
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, endpoint = hf_cache_dir(), hub_endpoint()
    unreachable = _unreachable_errors()
    cause = e.__cause__ or e.__context__
    fetch = f"`shortv download {label}`"
    if local_dir is not None:
        head = f"cannot download {label!r}" + (f" ({repo})" if repo != label else "") + f" into {local_dir}"
        where = f"not there and not in the Hugging Face cache ({cache})"
        todo = (f"rerun {fetch} where the Hub is reachable (it resumes), or copy {local_dir.name}/ over "
                "from a weight store that has it")
    else:
        head = f"cannot find model {label!r}" + (f" ({repo} on the Hub)" if repo != label else "")
        where = f"not in the Hugging Face cache ({cache})"
        if searched:
            where = f"not in {searched} nor the Hugging Face cache ({cache})"
        todo = (f"fetch it with {fetch} where the Hub is reachable, or pass the path of a local copy, "
                "or set $SHORTV_WEIGHTS to a weight store that has it")

    if _is_incomplete(e):
        return ModelNotFoundError(
            f"{head}: its copy in {local_dir or cache} is incomplete (an interrupted download?) and the "
            f"Hub cannot be asked for the rest; rerun {fetch} where the Hub is reachable (it resumes)")
    if isinstance(e, GatedRepoError):
        return ModelNotFoundError(
            f"{head}: {repo} is gated on the Hub: accept its terms at {endpoint}/{repo} and log in "
            f"with `hf auth login`, then run {fetch}")
    if isinstance(e, RepositoryNotFoundError | RevisionNotFoundError):
        return ModelNotFoundError(
            f"{head}: {where}, and the Hub ({endpoint}) has no model repo {repo} (or it is private: "
            "log in with `hf auth login`); check the name (`shortv zoo` lists the zoo)")
    # snapshot_download itself turns a connection failure into LocalEntryNotFoundError, from it.
    caused_by_network = isinstance(e, LocalEntryNotFoundError) and isinstance(cause, unreachable)
    offline = f"offline mode is on (HF_HUB_OFFLINE is set, unset it to ask the Hub); {todo}"
    if isinstance(e, unreachable) or caused_by_network:
        why = cause if caused_by_network else e
        if hub_offline() or isinstance(why, _offline_error()):
            return ModelNotFoundError(f"{head}: {where}, and {offline}")
        return ModelNotFoundError(
            f"{head}: {where}, and the Hugging Face Hub ({endpoint}) cannot be reached "
            f"({_one_line(why)}); {todo}")
    if isinstance(e, LocalEntryNotFoundError):
        if hub_offline():
            return ModelNotFoundError(f"{head}: {where}, and {offline}")
        return ModelNotFoundError(f"{head}: {where}; {todo}")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "an error")
        return ModelNotFoundError(
            f"{head}: {where}, and the Hub ({endpoint}) answered HTTP {status} for {repo}; {todo}")
    if isinstance(e, HFValidationError):
        return ModelNotFoundError(f"{head}: {repo!r} is not a valid Hub repo id ({_one_line(e)})")
    if isinstance(e, OSError):
        return CheckpointError(f"{head}: {_one_line(e)}")
    return None


def _offline_error() -> type[BaseException]:
    from huggingface_hub.utils import OfflineModeIsEnabled

    return OfflineModeIsEnabled


def _local_entry_error() -> type[BaseException]:
    from huggingface_hub.utils import LocalEntryNotFoundError

    return LocalEntryNotFoundError


def _one_line(e: BaseException) -> str:
    """`Type: message` on one line, long messages cut: error lines name causes, not dump them."""
    text = " ".join(str(e).split())
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's bars for the block unless `enabled` (they are global state, so
    restore them after); `enabled` never forces them on over HF_HUB_DISABLE_PROGRESS_BARS."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
