"""Official weights missing from torch.hub's cache are downloaded once, verified, and kept only when complete.

The official hosts are replaced by a loopback HTTP server in a thread (OBJSEG_WEIGHTS_MIRROR, as a user with
a mirror would set it); the checkpoints are small generated files with the official key layouts.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import pickle
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from pipeline.backbones import SPECS, BackboneParams, build_backbone, resolve_weights
from pipeline.errors import WeightsMismatchError, WeightsNotFoundError

SERVER_LIFETIME = 60  # seconds: the server stops by itself if a test never stops it


@functools.lru_cache(maxsize=None)
def _checkpoint(name: str, fill: float = 0.5) -> bytes:
    """A state dict with `name`'s exact keys and shapes, every value `fill`: each tensor is one element
    expanded (stride 0), so even a ViT's checkpoint is a few kilobytes."""
    with torch.device("meta"):  # the official layout, classifier included, without initialising it
        layout = SPECS[name].build().state_dict()
    state = {k: torch.full((), fill).expand(v.shape) for k, v in layout.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append(self.path)
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:server.send_bytes.get(self.path, len(body))])  # fewer bytes: then the connection closes

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.files, server.send_bytes, server.requests = {}, {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    deadline = threading.Timer(SERVER_LIFETIME, server.shutdown)
    thread.start()
    deadline.start()
    try:
        yield server
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback server standing in for the official hosts, and an empty torch.hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("OBJSEG_OFFLINE", raising=False)
    with _serving() as server:
        monkeypatch.setenv("OBJSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{server.server_port}")
        yield server


def _path(name: str) -> str:
    return urllib.parse.urlsplit(SPECS[name].url).path


def _cache(tmp_path: Path) -> Path:
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_missing_official_weights_are_downloaded_once_into_the_hub_cache(mirror, tmp_path, capsys):
    body = _checkpoint("dino_vits16")
    mirror.files[_path("dino_vits16")] = body
    path = resolve_weights(BackboneParams("dino_vits16"))
    assert path == _cache(tmp_path) / "dino_deitsmall16_pretrain.pth" and path.read_bytes() == body
    assert mirror.requests == ["/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"]  # the official path
    assert "downloading http://127.0.0.1" in capsys.readouterr().err
    backbone = build_backbone(BackboneParams("dino_vits16"))  # loads strictly, and does not fetch again
    assert torch.all(backbone.trunk.cls_token == 0.5) and len(mirror.requests) == 1
    assert sorted(p.name for p in _cache(tmp_path).iterdir()) == ["dino_deitsmall16_pretrain.pth"]


class _RunsACommand:
    def __reduce__(self):
        return (print, ("a downloaded file ran code",))


def _refused(kind: str) -> tuple[str, bytes, int | None, str]:
    """(backbone, body served, bytes actually sent, error) of a download that must not be kept."""
    if kind == "truncated":
        body = _checkpoint("dino_vits16")
        return "dino_vits16", body, len(body) // 2, r"broke off: \d+ of \d+ bytes received"
    if kind == "wrong hash":  # a valid MobileNetV2 layout, but not the file whose sha256 the name gives
        return "mobilenet_v2", _checkpoint("mobilenet_v2"), None, "does not start with b0353104"
    if kind == "wrong layout":  # DINO files have no published hash here: the strict layout is the check
        return "dino_vits16", _checkpoint("dino_resnet50"), None, "is not dino_vits16's weights"
    return "dino_vits16", pickle.dumps({"x": _RunsACommand()}, protocol=2), None, "not a loadable weights file"


@pytest.mark.parametrize("kind", ["truncated", "wrong hash", "wrong layout", "code"])
def test_a_download_that_does_not_verify_leaves_nothing_the_next_run_trusts(kind, mirror, tmp_path, capsys):
    name, body, sent, error = _refused(kind)
    mirror.files[_path(name)] = body
    if sent is not None:
        mirror.send_bytes[_path(name)] = sent
    with pytest.raises(WeightsMismatchError, match=error):
        resolve_weights(BackboneParams(name))
    assert not any(_cache(tmp_path).iterdir())  # neither the file nor a temporary one
    assert "ran code" not in capsys.readouterr().out
    if kind == "truncated":  # the next run downloads it again, whole
        del mirror.send_bytes[_path(name)]
        assert resolve_weights(BackboneParams(name)).read_bytes() == body and len(mirror.requests) == 2


def test_offline_gives_the_clear_error_and_fetches_nothing(mirror, tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="Not Found") as info:  # the server has no such file
        resolve_weights(BackboneParams("dino_vits8"))
    assert f"put it at {_cache(tmp_path) / 'dino_deitsmall8_pretrain.pth'}" in str(info.value)
    assert SPECS["dino_vits8"].url in str(info.value)  # the official URL, for a manual download
    monkeypatch.setenv("OBJSEG_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="OBJSEG_OFFLINE is set"):
        resolve_weights(BackboneParams("dino_vits8"))
    monkeypatch.setenv("OBJSEG_WEIGHTS_MIRROR", "http://127.0.0.1:9")  # nothing listens there: a refused connection
    monkeypatch.delenv("OBJSEG_OFFLINE")
    with pytest.raises(WeightsNotFoundError, match="refused"):
        resolve_weights(BackboneParams("dino_vits8"))
    assert len(mirror.requests) == 1 and not _cache(tmp_path).exists()
