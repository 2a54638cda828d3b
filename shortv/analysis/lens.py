"""The logit lens: each decoder layer's output (resid_post) read through the model's final
norm and LM head, at every position the layer holds, visual tokens included."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..models.batch import Encoded
from ..session import VisionLanguageModel
from ..token_types import TokenType


@dataclass
class LogitLens:
    """Per layer in `layers`, position and rank: the top tokens `token_ids` [L, T, k] and
    their probabilities `probs` [L, T, k]; `present` [L, T] marks the positions each layer
    held (False where a method dropped the token), `types` [T] the token types."""

    layers: list[int]
    token_ids: Tensor
    probs: Tensor
    present: Tensor
    types: Tensor

    def as_dict(self, model: VisionLanguageModel) -> dict[str, Any]:
        """A JSON-ready form: per layer, per present position, its type and top tokens
        (decoded text and probability)."""
        tokenizer = model.require_tokenizer()
        out: dict[str, Any] = {"layers": []}
        for li, layer in enumerate(self.layers):
            rows = []
            for t in range(self.types.shape[0]):
                if not bool(self.present[li, t]):
                    continue
                rows.append({"position": t, "type": TokenType(int(self.types[t])).name.lower(),
                             "top": [{"token": tokenizer.decode([int(i)]), "id": int(i), "prob": float(p)}
                                     for i, p in zip(self.token_ids[li, t], self.probs[li, t], strict=True)]})
            out["layers"].append({"layer": layer, "positions": rows})
        return out


@torch.inference_mode()
def logit_lens(model: VisionLanguageModel, encoded: Encoded, *, layers: Sequence[int] | None = None,
               types: Sequence[TokenType] | None = None, top_k: int = 5) -> LogitLens:
    """The top-`top_k` next tokens each of `layers` (all by default) predicts at every
    position of `encoded` (only positions of `types`, if given, are marked present), under
    the model's current method."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} is not allowed; use a positive integer")
    ids = list(range(model.num_layers)) if layers is None else list(layers)
    _, cache = model.run_with_cache(encoded, names=["resid_post"], layers=ids)
    decoder = model.module.decoder
    token_ids, probs, present = [], [], []
    for layer in ids:
        hidden = cache["resid_post", layer][0]
        p = decoder.head(hidden).float().softmax(dim=-1)
        top = p.topk(min(top_k, p.shape[-1]), dim=-1)
        token_ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
        present.append(cache.present["resid_post", layer][0].cpu())
    seq_types = cache.types[0].cpu()
    mask = torch.stack(present)
    if types is not None:
        wanted = torch.zeros_like(seq_types, dtype=torch.bool)
        for kind in types:
            wanted |= seq_types == int(TokenType(kind))
        mask = mask & wanted
    return LogitLens(ids, torch.stack(token_ids), torch.stack(probs), mask, seq_types)
