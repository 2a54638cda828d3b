"""One per-layer plan (`shortv.methods.layer_plan`) that the decoder runs and the FLOPs count
reads: the plan follows each method's definition, and for every registered method (and
compositions, and a method with answers none of them gives) the analytic FLOPs equal
torch's FlopCounterMode on the real decoder's prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from shortv.flops import sequence_flops
from shortv.methods import (
    DART,
    METHODS,
    VTW,
    Capture,
    FastV,
    LayerStep,
    LayerView,
    Method,
    PDrop,
    Queries,
    ShortV,
    SparseVLM,
    Vanilla,
    VisionZip,
    compose,
    layer_plan,
)
from shortv.models.config import TextConfig
from shortv.models.llama import Decoder
from shortv.token_types import TokenType

from .checkpoints import randomize

T, V = int(TokenType.TEXT), int(TokenType.VISUAL)

# A tiny Llama: grouped K/V and heads · head_dim != hidden, so that every width shows.
CONFIG = TextConfig(vocab_size=61, hidden_size=48, intermediate_size=80, layers=8, heads=4,
                    kv_heads=2, head_dim=16)


@dataclass(frozen=True)
class RanksOnItsOwnLayer(FastV):
    """FastV with answers no registered method gives: it ranks with layer k's own attention
    and keys, before its drop, and freezes the *text* rows of layer 0 and the visual rows
    of layer k + 1."""

    name = "ranks-on-its-own-layer"

    def capture(self, layer: int) -> Capture | None:
        if self.drops_at(layer):
            return Capture(queries=Queries.LAST, keys=True, before_drop=True)
        return None

    def frozen_type(self, layer: int) -> TokenType | None:
        return {0: TokenType.TEXT, self.k + 1: TokenType.VISUAL}.get(layer)


# One instance of every registered method, with parameters that do something on 8 layers
# and 24 visual tokens.
REGISTERED: dict[str, Method] = {
    "vanilla": Vanilla(),
    "shortv": ShortV((1, 4, 5)),
    "fastv": FastV(k=2, r=0.5),
    "vtw": VTW(k=5),
    "pdrop": PDrop(layers=(2, 4, 6), lam=0.5),
    "visionzip": VisionZip(budget=8),
    "dart": DART(k=2, budget=8),
    "sparsevlm": SparseVLM(layers=(1, 3, 5), budget=192),
}
CASES: dict[str, Method] = {
    **REGISTERED,
    "shortv+fastv": compose(ShortV((1, 3, 6)), FastV(k=3, r=0.75)),
    "shortv+pdrop": compose(ShortV((2, 5)), PDrop(layers=(2, 4, 6), lam=0.5)),
    "shortv+sparsevlm": compose(ShortV((0, 4)), SparseVLM(layers=(1, 3, 5), budget=192)),
    "shortv+vtw": compose(ShortV((1, 6)), VTW(k=4)),
    # Its first stage keeps no visual token of 24 (10 per 576): the later stages have none
    # left to rank or drop.
    "sparsevlm-keeps-none": SparseVLM(layers=(1, 3, 5), schedule=(10, 5, 1)),
    "own-answers": RanksOnItsOwnLayer(k=3, r=0.5),
}


def test_every_registered_method_is_checked():
    assert set(REGISTERED) == set(METHODS)
    assert all(type(method) is METHODS[name] for name, method in REGISTERED.items())


# ---- the plan follows the methods' definitions (docs/design.md §9) --------------------------


def test_plan_of_shortv_with_fastv():
    """ShortV freezes the visual rows of its layers; FastV(k) ranks with the last query's
    attention in layer k - 1 and drops before layer k."""
    last = Capture(queries=Queries.LAST)
    assert layer_plan(compose(ShortV((1, 4)), FastV(k=2, r=0.5)), 5) == (
        LayerStep(0),
        LayerStep(1, frozen=TokenType.VISUAL, capture_after=last),
        LayerStep(2, drops=True),
        LayerStep(3),
        LayerStep(4, frozen=TokenType.VISUAL),
    )


def test_plan_of_pdrop_ranks_in_the_stage_layer_before_its_drop():
    early = Capture(queries=Queries.LAST, before_drop=True)
    assert layer_plan(PDrop(layers=(1, 3), lam=0.5), 4) == (
        LayerStep(0),
        LayerStep(1, drops=True, capture_before=early),
        LayerStep(2),
        LayerStep(3, drops=True, capture_before=early),
    )


def test_plan_of_vtw_and_of_a_method_at_full_budget():
    assert layer_plan(VTW(k=2), 3) == (LayerStep(0), LayerStep(1), LayerStep(2, drops=True))
    assert layer_plan(FastV(k=1, r=0.0), 3) == layer_plan(Vanilla(), 3) == tuple(map(LayerStep, range(3)))


# ---- the FLOPs count equals torch's flop counter on the decoder running the plan ------------


@dataclass(frozen=True)
class KeepAside(Method):
    """`inner` with the FLOPs of its own `keep` arithmetic (similarities, rater scores),
    which the convention does not count, measured apart in `spent`."""

    inner: Method = field(default_factory=Vanilla)
    spent: list[int] = field(default_factory=list, compare=False)

    def drops_at(self, layer: int) -> bool:
        return self.inner.drops_at(layer)

    def capture_before_drop(self, layer: int) -> Capture | None:
        return self.inner.capture_before_drop(layer)

    def capture_after(self, layer: int) -> Capture | None:
        return self.inner.capture_after(layer)

    def frozen_type(self, layer: int) -> TokenType | None:
        return self.inner.frozen_type(layer)

    def keep(self, view: LayerView) -> torch.Tensor:
        # A nested counter: the outer one sees these FLOPs too; they are subtracted.
        with FlopCounterMode(display=False) as counter:
            kept = self.inner.keep(view)
        self.spent.append(counter.get_total_flops())
        return kept

    def merge(self, view: LayerView, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        with FlopCounterMode(display=False) as counter:
            merged = self.inner.merge(view, keep)
        self.spent.append(counter.get_total_flops())
        return merged

    @property
    def compacts_positions(self) -> bool:
        return self.inner.compacts_positions


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    model = Decoder(CONFIG).eval()
    randomize(model, seed=3)
    return model


def _prompt() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence (no padding: the decoder then computes exactly the sequence's rows):
    text, 24 visual tokens, text."""
    types = torch.tensor([T] * 5 + [V] * 24 + [T] * 6, dtype=torch.int8)[None]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, types.shape[1], CONFIG.hidden_size, generator=g)
    return x, types, torch.arange(types.shape[1])[None]


def _measured(decoder: Decoder, method: Method) -> tuple[int, torch.Tensor]:
    """FlopCounterMode's FLOPs of the decoder's prefill under `method` without those of
    `keep`'s own arithmetic, and the output. SDPA on its math backend, whose matmuls the
    counter sees (it does not count CPU's fused kernels)."""
    x, types, positions = _prompt()
    aside = KeepAside(method)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = decoder(x, types, positions, method=aside)
    return counter.get_total_flops() - sum(aside.spent), out


@pytest.mark.parametrize("name", list(CASES))
def test_counted_flops_equal_the_flop_counter(decoder, name):
    method = CASES[name].for_layers(CONFIG.layers)
    measured, _ = _measured(decoder, method)
    _, types, _ = _prompt()
    analytic = sequence_flops(CONFIG, method, types[0])
    assert measured > 0
    assert analytic == measured


def test_changed_answers_change_the_run_and_the_count_alike(decoder):
    """A subclass that answers otherwise than FastV (where it ranks, what it freezes) is
    run and counted by its own answers: other outputs, another count, still equal."""
    fastv, changed = FastV(k=3, r=0.5), RanksOnItsOwnLayer(k=3, r=0.5)
    fastv_flops, fastv_out = _measured(decoder, fastv)
    changed_flops, changed_out = _measured(decoder, changed)
    _, types, _ = _prompt()
    assert changed_flops != fastv_flops
    assert not torch.allclose(changed_out, fastv_out)
    assert sequence_flops(CONFIG, changed, types[0]) == changed_flops
    assert sequence_flops(CONFIG, fastv, types[0]) == fastv_flops
