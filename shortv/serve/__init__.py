"""`shortv serve`: the model over HTTP, in OpenAI's chat-completions format, with
continuous batching across requests (docs/design.md §11).

- `protocol`: request checking (`parse_chat_request`, `Limits`, `RequestError`) and the
  response, chunk and error shapes;
- `images`: `data:` URLs and local files under the image root, with size limits;
- `engine`: the batching engine (`Engine`, `Job`), one worker thread driving the model, and
  `compile_for_serving` (its decode step compiled for changing batches);
- `app`: the Starlette app (`create_app`) and the uvicorn runner (`run_server`); these
  need the `serve` extra: `pip install 'shortv[serve]'`.
"""

from .engine import Engine, Job, compile_for_serving
from .protocol import ChatRequest, Limits, RequestError, parse_chat_request

__all__ = ["ChatRequest", "Engine", "Job", "Limits", "RequestError", "compile_for_serving",
           "parse_chat_request"]
