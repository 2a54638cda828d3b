"""One exception family for everything shortv raises on purpose.

Every message says what was wrong and what to do about it; the CLI prints the
message on one line and exits with status 2.
"""

from __future__ import annotations


class ShortVError(Exception):
    """Base class of all errors raised by shortv."""


class ConfigError(ShortVError, ValueError):
    """A config.json, zoo card or argument value that cannot be used."""


class CheckpointError(ShortVError):
    """Weights that are missing, unreadable, or do not match the model."""


class ModelNotFoundError(ShortVError, FileNotFoundError):
    """A model name or path that resolves to nothing loadable."""


class InputError(ShortVError, ValueError):
    """A prompt, image or data file that the model cannot take."""


class ContextLengthError(InputError):
    """A prompt too long for the model's context, or for the KV cache it is to go into."""


# What a model name can be, for messages.
MODEL_SOURCES = "a zoo name (`shortv zoo` lists them), a checkpoint folder or a Hub repo id"


def require_model_name(source: object, *, accepted: str = MODEL_SOURCES) -> None:
    """ConfigError for a blank model name, which would otherwise resolve to the current
    directory (`Path("")` is "."); `accepted` says what to give instead."""
    if isinstance(source, str) and not source.strip():
        raise ConfigError(f"the model name is empty: give {accepted}")
