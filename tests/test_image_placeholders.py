"""Where images go when a prompt has no `<image>` placeholder: one rule (LLaVA's prompts put
one `<image>` line per image at the start of the first user text), shared by
`LLaVA.encode` (a conversation's images) and the server (a user message's images)."""

from __future__ import annotations

import pytest

from shortv.conversation import place_images


@pytest.mark.parametrize(("texts", "n_images", "placed"), [
    (["Describe it."], 1, ["<image>\nDescribe it."]),
    (["Compare.", "And now?"], 2, ["<image>\n<image>\nCompare.", "And now?"]),
    (["Hi."], 0, ["Hi."]),
    # A text that places any: nothing added, in any text (the caller checks the count).
    (["A <image> B"], 2, ["A <image> B"]),
    (["First.", "Then <image>"], 1, ["First.", "Then <image>"]),
])
def test_images_go_at_the_start_of_the_first_text_unless_placed(texts, n_images, placed):
    assert place_images(texts, n_images) == placed
