"""The paper's Layer Contribution algorithm, kept as the baseline that
`scripts/bench_lc.py` measures shortv's algorithm against (and the tests check it with).

One full forward pass per (layer, token type), with that layer's updates of that type
removed by a ShortV-style freeze, plus one normal pass: L(2L + 1) layer evaluations per
sample, where `shortv.lc.layer_contribution` needs L².
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shortv import LLaVA
from shortv.lc import TYPES, LCReport, kl
from shortv.methods import VANILLA, Method
from shortv.models.batch import Encoded
from shortv.token_types import TokenType


@dataclass(frozen=True)
class FreezeOne(Method):
    """Layer `layer` skips the updates of `kind` tokens; every other layer is vanilla."""

    layer: int = 0
    kind: TokenType = TokenType.VISUAL
    name = "freeze-one"

    def frozen_type(self, layer: int) -> TokenType | None:
        return self.kind if layer == self.layer else None


def naive_layer_contribution(
    model: LLaVA, samples: Sequence[Encoded], tokens: Sequence[str] = ("visual", "text")
) -> LCReport:
    """LC by L + 1 full passes per token type and sample."""
    kinds = [TYPES[t] for t in tokens]
    n_layers = model.num_layers
    totals = torch.zeros(len(kinds), n_layers, dtype=torch.float64)
    evaluations = 0
    with torch.inference_mode():
        for enc in samples:
            prepared = model.prepare([enc])
            p = model.module.decoder.head(model.hidden_states(prepared, method=VANILLA)[:, -1])
            evaluations += n_layers
            for j, kind in enumerate(kinds):
                for i in range(n_layers):
                    hidden = model.hidden_states(prepared, method=FreezeOne(i, kind))
                    q = model.module.decoder.head(hidden[:, -1])
                    totals[j, i] += float(kl(q, p)[0])
                    evaluations += n_layers
    mean = (totals / len(samples)).tolist()
    by_type = dict(zip([k.name.lower() for k in kinds], mean, strict=True))
    return LCReport(model=model.name, samples=len(samples), visual=by_type.get("visual"),
                    text=by_type.get("text"), layer_evaluations=evaluations)
