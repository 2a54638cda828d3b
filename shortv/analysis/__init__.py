"""Tools for studying what the decoder layers do, built on the layers' hook points
(`model.run_with_hooks` / `run_with_cache`, `shortv.models.taps`):

- interventions to pass as hooks: `zero_ablate`, `mean_ablate`, `patch`, `steer`
  (each selects rows by token type and/or sequence positions);
- `logit_lens`: each layer's residual stream read through the final norm and LM head;
- `heatmap` / `token_map`: any per-visual-token score drawn over the picture.
"""

from .heatmap import heatmap, token_map
from .interventions import mean_ablate, patch, steer, zero_ablate
from .lens import LogitLens, logit_lens

__all__ = ["LogitLens", "heatmap", "logit_lens", "mean_ablate", "patch", "steer", "token_map", "zero_ablate"]
