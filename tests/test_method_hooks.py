"""Hook points are `Hook` members, not strings: every registered method declares its own
with the enum, and a composition answers each one with the part that owns it."""

from __future__ import annotations

import pytest

from shortv.methods import METHODS, FastV, Hook, ShortV, VisionZip, compose


@pytest.mark.parametrize("cls", list(METHODS.values()), ids=list(METHODS))
def test_every_method_names_its_hook_points_with_the_enum(cls):
    assert all(isinstance(hook, Hook) for hook in cls.hooks)


def test_a_composition_owns_the_union_of_its_parts_hooks():
    method = compose(ShortV((1,)), FastV(k=2, r=0.5), VisionZip(budget=8))
    assert method.hooks == {Hook.LAYERS, Hook.TOKENS, Hook.IMAGE}
    assert all(isinstance(hook, Hook) for hook in method.hooks)
