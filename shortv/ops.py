"""Small building blocks shared by the vision tower and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """nn.Linear, computed as (W @ xᵀ)ᵀ for fp32 on the CPU.

    Same parameters and result; only the GEMM's operand layout differs. MKL's sgemm runs
    the weight-on-the-left form 10–35% faster on our CPUs, most for the few-row inputs of
    frozen layers (BENCHMARKS.md); elsewhere F.linear is used as usual.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = (self.weight @ flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
