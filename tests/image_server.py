"""A local HTTP server for the image-URL tests (no network beyond localhost).

Serves fixed bodies by path: each is (content type, body, whether to send Content-Length);
any other path is a 404.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

Routes = dict[str, tuple[str, bytes, bool]]


@contextmanager
def serving(routes: Routes) -> Iterator[str]:
    """Serve `routes` on 127.0.0.1 in a thread; yields the base URL (http://127.0.0.1:PORT)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server calls it by this name
            if self.path not in routes:
                self.send_error(404, "no such image")
                return
            content_type, body, with_length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if with_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")  # the body ends when the connection does
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then closed), so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def silent_port() -> Iterator[int]:
    """A localhost port that accepts connections but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]
