"""Composition: a layer-wise method (ShortV) with token-wise ones, e.g.
`compose(ShortV(layers), FastV(k=2, r=0.5))` or `--method shortv+fastv`.

Each part owns its hook points (`Method.hooks`): at most one method freezes layers, one
drops tokens inside the language model, one reduces images before it. The decoder asks the
composition, which answers with the part that owns the question; so visual tokens that
survive a drop are still frozen in ShortV's layers, and FLOPs count both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..errors import ConfigError
from ..token_types import TokenType
from .base import VANILLA, Capture, Hook, ImageView, LayerView, Method


@dataclass(frozen=True)
class Compose(Method):
    """Methods applied together, each at its own hook points (see the module docstring)."""

    parts: tuple[Method, ...] = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        """The parts' names joined as the CLI spells a composition, e.g. "shortv+fastv"."""
        return "+".join(part.name for part in self.parts) or "vanilla"

    def __post_init__(self) -> None:
        flat: list[Method] = []
        for part in self.parts:
            if not isinstance(part, Method):
                raise ConfigError(f"compose() takes shortv methods, got {part!r}")
            flat += part.parts if isinstance(part, Compose) else [part]
        flat = [p for p in flat if p.hooks]  # vanilla parts do nothing
        owners: dict[Hook, Method] = {}
        for part in flat:
            for hook in part.hooks:
                if hook in owners:
                    raise ConfigError(
                        f"cannot compose {owners[hook].describe()} with {part.describe()}: both "
                        f"{_HOOK_WORDS[hook]}; compose at most one method of each kind")
                owners[hook] = part
        object.__setattr__(self, "parts", tuple(flat))
        object.__setattr__(self, "_owners", owners)

    @property
    def hooks(self) -> frozenset[Hook]:  # type: ignore[override]
        return frozenset(self._owners)

    def _owner(self, hook: Hook) -> Method:
        return self._owners.get(hook, VANILLA)

    def frozen_type(self, layer: int) -> TokenType | None:
        return self._owner(Hook.LAYERS).frozen_type(layer)

    def drops_at(self, layer: int) -> bool:
        return self._owner(Hook.TOKENS).drops_at(layer)

    def capture(self, layer: int) -> Capture | None:
        return self._owner(Hook.TOKENS).capture(layer)

    def keep(self, view: LayerView) -> Tensor:
        return self._owner(Hook.TOKENS).keep(view)

    @property
    def reduces_images(self) -> bool:
        return self._owner(Hook.IMAGE).reduces_images

    def reduce_image(self, image: ImageView) -> Tensor:
        return self._owner(Hook.IMAGE).reduce_image(image)

    def image_tokens(self, n_visual: int) -> int:
        return self._owner(Hook.IMAGE).image_tokens(n_visual)

    def keeps_image(self, n_patches: int) -> bool:
        return self._owner(Hook.IMAGE).keeps_image(n_patches)

    def validate(self, num_layers: int) -> None:
        for part in self.parts:
            part.validate(num_layers)

    def for_layers(self, num_layers: int) -> Method:
        fitted = [part.for_layers(num_layers) for part in self.parts]
        if not fitted:
            return VANILLA
        return fitted[0] if len(fitted) == 1 else Compose(tuple(fitted))

    def describe(self) -> str:
        return " + ".join(part.describe() for part in self.parts) or "vanilla"


_HOOK_WORDS = {
    Hook.LAYERS: "freeze tokens inside layers",
    Hook.TOKENS: "drop tokens inside the language model",
    Hook.IMAGE: "reduce visual tokens before the language model",
}


def compose(*methods: Method) -> Method:
    """One method that applies all of `methods` (at most one of each kind: layer freezing,
    in-model token dropping, image reduction)."""
    return Compose(tuple(methods))


def map_parts(method: Method, fn: Callable[[Method], Method]) -> Method:
    """`method` with `fn` applied to each of its parts (to itself when not a composition):
    how a model family fills in the defaults its authors' code uses for it."""
    if isinstance(method, Compose):
        return Compose(tuple(fn(part) for part in method.parts))
    return fn(method)
