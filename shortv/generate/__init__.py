"""Text generation: greedy, sampling, streaming and batches, over what a model offers for
it (`GenerativeModel`: `prefill`, `step`, its tokenizer and template). `shortv.LLaVA` is
one such model; its `chat` and `generate` call this package."""

from .loop import GenerationResult, generate, stream, token_steps
from .protocol import GenerativeModel
from .sampling import GenerationOptions, pick
from .text import TextAssembler

__all__ = ["GenerationOptions", "GenerationResult", "GenerativeModel", "TextAssembler", "generate", "pick",
           "stream", "token_steps"]
