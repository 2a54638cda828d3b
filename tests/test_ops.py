"""shortv.ops.Linear: the weight-left GEMM form equals nn.Linear, in either memory layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shortv.ops import WEIGHT_LEFT_MIN_WIDTH, Linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (2, 37), (3, 5)])
def test_weight_left_form_equals_linear(bias, shape):
    torch.manual_seed(0)
    width = WEIGHT_LEFT_MIN_WIDTH
    layer = Linear(width, width + 8, bias=bias)
    x = torch.randn(*shape, width)
    want = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    for contiguous in (False, True):
        got = layer(x, contiguous=contiguous)
        assert got.shape == (*shape, width + 8)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        if contiguous:
            assert got.is_contiguous()


def test_narrow_layers_use_plain_linear():
    layer = Linear(64, 32)
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer(x).is_contiguous()
