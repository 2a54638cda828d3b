"""LLaVA-1.5 / LLaVA-NeXT as `shortv.load` returns them: the session over `LlavaModel`
with LLaVA's image preprocessing (pad / anyres, `shortv.image.ImageProcessor`). Everything
else a loaded model offers is `shortv.session.VisionLanguageModel`'s."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from .conversation import Template, cli_template_name
from .image import ImageProcessor, llava_token_boxes
from .models.batch import Encoded
from .models.llava import LlavaModel
from .session import NO_TOKENIZER, VisionLanguageModel
from .tokenizer import Tokenizer


class LLaVA(VisionLanguageModel):
    """A LLaVA-1.5 / LLaVA-NeXT model with ShortV and the token-reduction methods built in.

    Build one with `shortv.load(...)`. `module` is the torch module (`LlavaModel`, the
    weights); the tokenizer, template and method are this object's. Without a tokenizer
    it works on prepared inputs only (`missing_tokenizer` says why there is none).
    """

    module: LlavaModel
    # LLaVA's CLI reads the model's name (llava/serve/cli.py): llava_v1 for "v1", ...
    cli_template = staticmethod(cli_template_name)

    def __init__(
        self,
        module: LlavaModel,
        *,
        tokenizer: Tokenizer | None = None,
        template: str | Template = "vicuna_v1",
        name: str = "",
        checkpoint_dir: Path | None = None,
        missing_tokenizer: str = NO_TOKENIZER,
    ) -> None:
        super().__init__(module, processor=ImageProcessor.for_config(module.config), tokenizer=tokenizer,
                         template=template, name=name, checkpoint_dir=checkpoint_dir,
                         missing_tokenizer=missing_tokenizer)

    def visual_boxes(self, encoded: Encoded) -> list[Tensor]:
        """As `VisionLanguageModel.visual_boxes`: LLaVA's pad / square / anyres geometry."""
        c = self.module.config
        return [llava_token_boxes(size, image_size=c.vision.image_size, patch=c.vision.patch_size,
                                  aspect_ratio=c.image_aspect_ratio, merge=c.patch_merge_type,
                                  grid_pinpoints=c.image_grid_pinpoints)
                for size in encoded.image_sizes]
