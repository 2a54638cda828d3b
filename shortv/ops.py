"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Both sides of the weight at least this wide: the weight-left GEMM form pays off there.
WEIGHT_LEFT_MIN_WIDTH = 2048


class Linear(nn.Linear):
    """nn.Linear, computed as (W @ xᵀ)ᵀ for wide fp32 weights on the CPU.

    Same parameters and result; only the GEMM's operand layout differs. MKL's sgemm runs
    the weight-on-the-left form 10–50% faster for 7B/13B widths (4096 and up, most for the
    few-row inputs of frozen layers and decode steps) but 20–30% slower at widths of 1024
    (BENCHMARKS.md), so it is used only when both sides are WEIGHT_LEFT_MIN_WIDTH or more.
    Its result is laid out column-major: callers that need row-major memory (attention
    kernels) ask for `contiguous=True`.
    """

    def forward(self, x: Tensor, *, contiguous: bool = False) -> Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32
                or min(self.in_features, self.out_features) < WEIGHT_LEFT_MIN_WIDTH):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        if self.bias is not None:
            y = torch.addmm(self.bias[:, None], self.weight, flat.t()).t()
        else:
            y = (self.weight @ flat.t()).t()
        y = y.contiguous() if contiguous else y
        return y.reshape(*x.shape[:-1], y.shape[-1])
