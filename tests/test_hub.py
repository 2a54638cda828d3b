"""The Hugging Face cache and Hub, without the network: an unreachable Hub (a closed loopback
port), offline mode, a fake Hub served on 127.0.0.1, and `store.download` into a weight store.

Nothing here may leave the machine: every test runs behind a guard that refuses name lookups and
connections to anything but the loopback address.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import are_progress_bars_disabled, close_session

import shortv
import shortv.cli
from shortv import ConfigError, ModelNotFoundError, hub
from shortv.store import download, download_plan, local_weights, locate, looks_like_path, store_name

REPO = Path(shortv.__file__).resolve().parents[1]
# An upper bound on a hang, not a benchmark: huggingface_hub's backoff on an unreachable Hub
# sleeps 1+2+4+8+8 s, so anything retrying fails this.
FAST_S = 10.0
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test on any name lookup or connection beyond 127.0.0.1."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK:
            raise AssertionError(f"a test looked up {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"a test connected to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def point_hub_at(monkeypatch, endpoint: str) -> None:
    """Make huggingface_hub (which read HF_ENDPOINT at import) talk to `endpoint`."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty HF cache and no extra weight store; online, the Hub at a closed loopback port.
    (huggingface_hub reads its environment at import, so its constants are patched too.)"""
    home = tmp_path / "hf-home"
    home.mkdir()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SHORTV_WEIGHTS", *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Where this version keeps a registry it fetches from the Hub: not the real HF_HOME.
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"), raising=False)
    point_hub_at(monkeypatch, closed_port_url())
    close_session()  # a fresh HTTP client, built without the proxies just removed
    yield home
    close_session()


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def subprocess_env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SHORTV_WEIGHTS", *PROXY_VARS}}
    return {**env, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_ENDPOINT": endpoint,
            "OMP_NUM_THREADS": "1", **extra}


# ---- a fake Hub on 127.0.0.1 ----------------------------------------------------------------


class FakeHub:
    """Just enough of the Hub's HTTP API for `model_info` and `snapshot_download`: repo info,
    the tree listing, and file downloads, for repos given as {repo id: {path: content}}."""

    def __init__(self, repos: dict[str, dict[str, bytes]], *, status: int = 200):
        self.repos, self.status, self.requests = repos, status, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def reply(self, code: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def answer(self, body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                parts = unquote(urlsplit(self.path).path).strip("/").split("/")
                js = {"Content-Type": "application/json"}
                if hub.status != 200:
                    return self.reply(hub.status, b'{"error": "down"}', js, body)
                if parts[:2] == ["api", "models"]:
                    repo, rest = "/".join(parts[2:4]), parts[4:]
                    if repo not in hub.repos:
                        return self.reply(404, b'{"error": "Repository not found"}',
                                          {**js, "X-Error-Code": "RepoNotFound"}, body)
                    files = hub.repos[repo]
                    if not rest or rest[0] == "revision":
                        data = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                    else:  # tree/<revision>
                        data = [{"type": "file", "path": f, "size": len(b), "oid": _sha1(b)}
                                for f, b in files.items()]
                    return self.reply(200, json.dumps(data).encode(), js, body)
                repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                if parts[2:3] == ["resolve"] and name in hub.repos.get(repo, {}):
                    content = hub.repos[repo][name]
                    return self.reply(200, content, {"X-Repo-Commit": COMMIT,
                                                     "ETag": f'"{_sha1(content)}"'}, body)
                return self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> set[str]:
        """The files downloaded (GET .../resolve/...), as repo/path."""
        return {unquote(r.split(" ", 1)[1]).lstrip("/").replace(f"/resolve/{COMMIT}", "")
                for r in self.requests if r.startswith("GET") and "/resolve/" in r}


def _sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


def llava_files(weights: str = "safetensors") -> dict[str, bytes]:
    """A repo's worth of (fake) files: configs, tokenizer, weights in one or both formats."""
    files = {"config.json": b'{"model_type": "llava"}', "tokenizer.model": b"sp",
             "tokenizer_config.json": b"{}", "README.md": b"# not needed", "training_args.bin": b"no"}
    if weights in ("safetensors", "both"):
        files["model.safetensors"] = b"S" * 64
    if weights in ("bin", "both"):
        files |= {"pytorch_model-00001-of-00002.bin": b"B1", "pytorch_model-00002-of-00002.bin": b"B2",
                  "pytorch_model.bin.index.json": b'{"weight_map": {}}'}
    return files


@pytest.fixture
def fake_hub(hf_home, monkeypatch) -> Iterator[FakeHub]:
    hub = FakeHub({
        "someorg/some-llava": llava_files("both"),
        "someorg/bin-llava": llava_files("bin"),
        "liuhaotian/llava-v1.5-7b": llava_files("bin"),
        "openai/clip-vit-large-patch14-336": {"config.json": b'{"model_type": "clip"}',
                                              "model.safetensors": b"C" * 8, "pytorch_model.bin": b"c"},
    })
    point_hub_at(monkeypatch, hub.url)
    yield hub
    hub.close()


def timed(fn, *args, **kwargs):
    """(exception raised, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        fn(*args, **kwargs)
    return str(info.value), time.monotonic() - start


# ---- an unreachable Hub ---------------------------------------------------------------------


@pytest.mark.parametrize("source,repo", [("llava-v1.5-7b", "liuhaotian/llava-v1.5-7b"),
                                         ("someone/some-repo", "someone/some-repo")])
def test_unreachable_hub_fails_fast_in_one_line(hf_home, source, repo):
    message, elapsed = timed(locate, source)
    assert elapsed < FAST_S, f"took {elapsed:.1f} s: retrying an unreachable Hub?"
    assert "\n" not in message
    assert repr(source) in message and repo in message
    assert str(REPO / "weights" / store_name(source)) in message  # the weight store
    assert str(hf_home / "hub") in message  # the HF cache actually in use
    assert "cannot be reached" in message and constants.ENDPOINT in message
    assert "ConnectError" in message  # why, by type
    assert f"`shortv download {source}`" in message and "SHORTV_WEIGHTS" in message
    assert "scripts/download.py" not in message


def test_unreachable_hub_names_every_weight_store(hf_home, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("SHORTV_WEIGHTS", str(store))
    message, _ = timed(locate, "llava-v1.5-13b")
    assert str(store / "llava-v1.5-13b") in message and str(REPO / "weights" / "llava-v1.5-13b") in message


@pytest.mark.parametrize("source", ["llava-v1.5-7b", "someone/some-repo"])
def test_offline_fails_fast_without_asking(offline, monkeypatch, source):
    def refuse(*args, **kwargs):
        raise AssertionError("offline, yet a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    message, elapsed = timed(locate, source)
    assert elapsed < FAST_S
    assert "\n" not in message and repr(source) in message
    assert "offline" in message and "HF_HUB_OFFLINE" in message
    assert str(offline / "hub") in message and f"`shortv download {source}`" in message


def test_offline_mode_is_read_from_huggingface_hub_at_call_time(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_offline()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.hub_offline()


def test_cli_unreachable_hub_is_one_line_exit_2(hf_home, capsys):
    start = time.monotonic()
    status = shortv.cli.main(["chat", "--model", "llava-v1.5-7b", "--prompt", "hi"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2, err
    assert elapsed < FAST_S
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "shortv download llava-v1.5-7b" in lines[0]
    assert "internal error" not in err and "Retrying" not in err


def test_cli_subprocess_unreachable_hub(hf_home, tmp_path):
    """As a user sees it: no retry chatter, one line, exit 2, well before any backoff ends."""
    env = subprocess_env(hf_home, closed_port_url())
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "shortv", "chat", "--model", "someone/some-repo",
                           "--prompt", "hi"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "shortv download someone/some-repo" in done.stderr and "cannot be reached" in done.stderr
    assert elapsed < 2 * FAST_S  # includes starting Python and importing torch; backoff alone is 23 s


# ---- sources that are paths -----------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(hub, "hub_snapshot", refuse)


@pytest.mark.parametrize("source", ["./nope", "../nope", "nope/", "/no/such/shortv-dir", "a/b/c",
                                    "~/no-such-shortv-dir", "./llava-v1.5-7b"])
def test_missing_path_is_reported_as_that_path(no_hub, tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        locate(source)
    message = str(info.value)
    assert f"no such directory: {source}" in message
    assert os.path.abspath(os.path.expanduser(source)) in message
    assert "weight store" not in message and "Hub" not in message


def test_relative_path_names_where_it_was_looked_for(no_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        locate("./nope")
    assert f"no such directory: ./nope ({tmp_path / 'nope'})" in str(info.value)
    checkpoint = tmp_path / "ck"
    with pytest.raises(ModelNotFoundError) as info:
        locate("./tower", relative_to=checkpoint)
    assert str(checkpoint / "tower") in str(info.value)


def test_a_file_is_not_a_directory(no_hub, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        locate(str(f))
    assert f"not a directory: {f}" in str(info.value)


@pytest.mark.parametrize("source,is_path", [
    ("llava-v1.5-7b", False), ("owner/name", False), ("owner/name.v2", False),
    ("./x", True), ("../x", True), ("/x", True), ("~", True), ("~/x", True), (".", True),
    ("owner/name/", True), ("a/b/c", True), ("x/", True),
])
def test_looks_like_path(source, is_path):
    assert looks_like_path(source) is is_path


def test_tower_beside_the_checkpoint(no_hub, tmp_path):
    """`download(NAME, to=DIR)` puts the tower beside the model; a checkpoint finds it there."""
    (tmp_path / "llava-v1.5-7b").mkdir()
    tower = tmp_path / "openai--clip-vit-large-patch14-336"
    tower.mkdir()
    (tower / "config.json").write_text("{}")
    found = locate("openai/clip-vit-large-patch14-336", relative_to=tmp_path / "llava-v1.5-7b")
    assert found == tower


# ---- a Hub that answers ---------------------------------------------------------------------


def test_locate_downloads_needed_files_into_the_cache(fake_hub, hf_home):
    path = locate("someorg/some-llava")
    assert path.is_relative_to(hf_home / "hub")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors",
                                                      "tokenizer.model", "tokenizer_config.json"]
    assert fake_hub.fetched() == {f"someorg/some-llava/{n}" for n in
                                  ("config.json", "model.safetensors", "tokenizer.model",
                                   "tokenizer_config.json")}


def test_cached_copy_serves_offline_and_when_the_hub_is_gone(fake_hub, hf_home, monkeypatch):
    first = locate("someorg/some-llava")  # the cache now lists .bin files it never fetched
    fake_hub.close()
    point_hub_at(monkeypatch, closed_port_url())
    start = time.monotonic()
    assert locate("someorg/some-llava") == first  # unreachable: the cache will do
    assert time.monotonic() - start < FAST_S
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert locate("someorg/some-llava") == first  # offline: likewise, not "incomplete"


def test_unknown_repo_on_a_reachable_hub(fake_hub):
    message, elapsed = timed(locate, "someorg/no-such-llava")
    assert elapsed < FAST_S and "\n" not in message
    assert "has no model repo someorg/no-such-llava" in message and fake_hub.url in message


def test_failing_hub_falls_back_to_the_cache(fake_hub):
    cached = locate("someorg/some-llava")
    fake_hub.status = 503
    assert locate("someorg/some-llava") == cached
    message, elapsed = timed(locate, "someorg/bin-llava")  # nothing cached
    assert elapsed < FAST_S and "answered HTTP 503" in message
    assert "`shortv download someorg/bin-llava`" in message


# ---- store.download -------------------------------------------------------------------------


def test_download_zoo_model_with_its_tower(fake_hub, tmp_path):
    store = tmp_path / "store"
    target = download("llava-v1.5-7b", to=store, progress=False)
    assert target == store / "llava-v1.5-7b"
    files = {p.name for p in target.iterdir() if p.is_file()}
    assert files == {"config.json", "tokenizer.model", "tokenizer_config.json",
                     "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json"}  # .bin-only: its shards, not training_args.bin
    tower = store / "openai--clip-vit-large-patch14-336"
    assert {p.name for p in tower.iterdir() if p.is_file()} == {"config.json", "model.safetensors"}
    assert not are_progress_bars_disabled()  # progress=False is undone afterwards
    # Again: everything is there, nothing is fetched twice.
    before = len(fake_hub.fetched())
    download("llava-v1.5-7b", to=store, progress=False)
    assert len(fake_hub.fetched()) == before


def test_download_into_the_default_store(fake_hub, tmp_path, monkeypatch):
    store = tmp_path / "weights"
    monkeypatch.setenv("SHORTV_WEIGHTS", str(store))
    assert download("someorg/some-llava", progress=False) == store / "someorg--some-llava"
    assert local_weights("someorg/some-llava") == store / "someorg--some-llava"
    assert locate("someorg/some-llava") == store / "someorg--some-llava"  # no Hub needed now


def test_download_offline_links_from_the_hf_cache(fake_hub, tmp_path, monkeypatch):
    cached = locate("someorg/some-llava")
    fake_hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    target = download("someorg/some-llava", to=tmp_path / "store", progress=False)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in cached.iterdir())
    assert (target / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


def test_download_offline_of_nothing_cached(offline, tmp_path):
    message, elapsed = timed(download, "llava-v1.5-7b", to=tmp_path / "store")
    assert elapsed < FAST_S and "\n" not in message
    assert str(tmp_path / "store" / "llava-v1.5-7b") in message and "offline" in message
    assert "liuhaotian/llava-v1.5-7b" in message and str(offline / "hub") in message


def test_download_unreachable(hf_home, tmp_path):
    message, elapsed = timed(download, "someorg/x", to=tmp_path / "store")
    assert elapsed < FAST_S and "cannot be reached" in message and "`shortv download someorg/x`" in message


def test_download_plan():
    store = Path("/somewhere")
    assert download_plan("llava-v1.5-13b", store) == [
        ("liuhaotian/llava-v1.5-13b", store / "llava-v1.5-13b"),
        ("openai/clip-vit-large-patch14-336", store / "openai--clip-vit-large-patch14-336")]
    # LLaVA-NeXT carries its tower; so do the transformers-layout alternates.
    assert download_plan("llava-v1.6-vicuna-7b", store) == [
        ("liuhaotian/llava-v1.6-vicuna-7b", store / "llava-v1.6-vicuna-7b")]
    assert download_plan("llava-v1.5-7b", store, alternate=True) == [
        ("llava-hf/llava-1.5-7b-hf", store / "llava-v1.5-7b")]
    assert download_plan("owner/name", store) == [("owner/name", store / "owner--name")]


@pytest.mark.parametrize("source,error,fragment", [
    ("llava-tiny-demo", ConfigError, "ships with shortv"),
    ("llava-v9", ModelNotFoundError, "shortv zoo"),
    ("./weights/llava-v1.5-7b", ModelNotFoundError, "a path"),
])
def test_download_refuses_before_any_network(no_hub, source, error, fragment):
    with pytest.raises(error, match=fragment):
        download(source)


def test_download_argument_errors(no_hub, tmp_path):
    with pytest.raises(ConfigError, match="only zoo models"):
        download("owner/name", alternate=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        download("llava-v1.5-7b", to=tmp_path / "file")


def test_download_script_is_a_thin_wrapper(fake_hub, hf_home, tmp_path):
    env = subprocess_env(hf_home, fake_hub.url)
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "scripts/download.py", "someorg/bin-llava", "--to", str(store),
                           "--quiet"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"someorg/bin-llava -> {store / 'someorg--bin-llava'}" in done.stdout
    assert (store / "someorg--bin-llava" / "pytorch_model.bin.index.json").is_file()
    assert str(store / "someorg--bin-llava") in done.stdout.splitlines()[-1]  # load it by path
