"""The per-layer plan of a method: what each decoder layer does, and the one order it is
done in (docs/design.md §9.1).

`layer_plan(method, num_layers)` asks the method its per-layer questions (`drops_at`,
`capture_before_drop`, `frozen_type`, `capture_after`) once and returns a tuple of
`LayerStep`s, plain constants. `walk_plan` runs steps in order on a `PlanPass`: the
decoder's pass (`shortv.models.llama`) computes hidden states, the FLOPs count's (`shortv.flops`)
counts tokens, so the two cannot disagree about which rows a layer computes, keeps, drops
or freezes, or about which hook fires when.

What depends on the data stays with the pass: whether any visual token is left (nothing
to drop or capture otherwise), and which tokens `Method.keep` keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..token_types import TokenType
from .base import Capture, Method


@dataclass(frozen=True)
class LayerStep:
    """What decoder layer `layer` does under a method.

    drops: tokens may be dropped before the layer (`Method.keep` decides which); the layers
        from here on hold other tokens, so a new segment starts even when none is dropped.
    capture_before: what the layer reports on its input, before the drop, for that drop.
    frozen: the token type whose rows the layer does not compute (they pass through).
    capture_after: what the layer reports after it ran, for a later drop.
    """

    layer: int
    drops: bool = False
    capture_before: Capture | None = None
    frozen: TokenType | None = None
    capture_after: Capture | None = None


def layer_plan(method: Method, num_layers: int) -> tuple[LayerStep, ...]:
    """The steps of layers 0..num_layers-1 under `method` (a method fitted to the depth,
    `Method.for_layers`)."""
    steps = []
    for layer in range(num_layers):
        drops = method.drops_at(layer)
        steps.append(LayerStep(
            layer,
            drops=drops,
            capture_before=method.capture_before_drop(layer) if drops else None,
            frozen=method.frozen_type(layer),
            capture_after=method.capture_after(layer),
        ))
    return tuple(steps)


class PlanPass(Protocol):
    """One pass through the layers, moved along by `walk_plan` (what each hook does)."""

    def visual_left(self) -> bool:
        """Whether the tokens at hand include any visual one."""
        ...

    def capture_before(self, step: LayerStep) -> None:
        """Compute `step.capture_before` on the layer's input (it has visual tokens)."""
        ...

    def drop(self, step: LayerStep) -> None:
        """Keep the tokens `Method.keep` keeps, from the latest capture since the last drop."""
        ...

    def nothing_to_drop(self, step: LayerStep) -> None:
        """A drop layer reached without visual tokens: the same tokens go on."""
        ...

    def run_layer(self, step: LayerStep, capture: Capture | None) -> None:
        """Run the layer on the rows not of type `step.frozen`; also compute `capture`."""
        ...


def walk_plan(steps: Iterable[LayerStep], run: PlanPass) -> None:
    """Run `steps` in order on `run`. The order, for each layer: at a drop layer, if any
    visual token is left, the capture before the drop, then the drop; then the layer on
    its rows (frozen ones skipped), which also reports `capture_after` while visual tokens
    are left to drop later."""
    for step in steps:
        if step.drops:
            if run.visual_left():
                if step.capture_before is not None:
                    run.capture_before(step)
                run.drop(step)
            else:
                run.nothing_to_drop(step)
        run.run_layer(step, step.capture_after if run.visual_left() else None)
