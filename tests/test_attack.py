"""An outside attack, replayed against a real server: each test is a row of RELIABILITY.md's
"Attacks" table (what was sent, what happened before, what must happen now)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import Server, tone
from test_reliability import rss_mb

from diffgap.encoders import EncoderLoadError, load_encoders
from diffgap.media.video import decode_video, write_video
from service.routers.items import wav_bytes

SURROGATE = "a lone surrogate \ud800 in a query"


def post_json(c: httpx.Client, path: str, body: dict) -> httpx.Response:
    """json.dumps escapes a lone surrogate as \\ud800: valid JSON that no UTF-8 encoder would write."""
    return c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_lone_surrogates_are_a_422_and_do_not_fail_their_neighbours(client):
    res = post_json(client, "/v1/search", {"text": SURROGATE})
    assert res.status_code == 422 and "not valid Unicode" in res.text
    res = post_json(client, "/v1/search/batch", {"texts": ["a beep", SURROGATE]})
    assert res.status_code == 422 and "texts[1]" in res.text

    def innocent(i: int) -> int:
        return post_json(client, "/v1/search", {"text": f"a high beep {i}", "k": 3}).status_code

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(innocent, i) for i in range(30)]
            poisoned = pool.submit(post_json, client, "/v1/search", {"text": SURROGATE, "k": 3})
            codes = [f.result() for f in futures]
        assert codes == [200] * 30 and poisoned.result().status_code == 422


def test_huge_range_numbers_and_malformed_ranges_get_416_on_both_audio_routes(client):
    item = client.post("/v1/search", json={"text": "a beep", "k": 1}).json()["results"][0]["id"]
    for header in ("bytes=" + "9" * 5000 + "-", "bytes=0-" + "1" * 5000, "bytes=abc", "bytes=5-1,7-9", "items=0-4"):
        for params in ({}, {"full": "true"}):
            res = client.get(f"/v1/items/{item}/audio", params=params, headers={"Range": header})
            assert res.status_code == 416, (header[:20], params, res.status_code)
    for params in ({}, {"full": "true"}):  # a valid range still works on both
        res = client.get(f"/v1/items/{item}/audio", params=params, headers={"Range": "bytes=0-9"})
        assert res.status_code == 206 and len(res.content) == 10


@pytest.mark.parametrize("ms", [5, 20, 32, 60])
def test_very_short_audio_queries_are_a_422(client, ms):
    samples = tone(440, ms / 1000, 16000)
    res = client.post("/v1/search/audio", files={"file": ("short.wav", wav_bytes(samples, 16000), "audio/wav")})
    assert res.status_code == 422 and "needs at least 100 ms" in res.json()["detail"]


def test_embeddings_that_overflow_float32_are_a_422(client):
    dim = client.get("/readyz").json()["dim"]
    for value in (1e39, -3.5e38):
        res = client.post("/v1/search", json={"embedding": [value] + [0.1] * (dim - 1), "refine": False})
        assert res.status_code == 422 and "float32" in res.text


def test_json_bodies_are_capped_while_they_stream(client):
    huge = json.dumps({"text": "a" * 20, "filters": {"description": "x" * (12 * 1024 * 1024)}}).encode()
    assert client.post("/v1/search", content=huge, headers={"Content-Type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"texts": ['
        for _ in range(200):
            yield b'"' + b"y" * 65536 + b'",'
        yield b'"z"]}'

    res = client.post("/v1/search/batch", content=chunks(), headers={"Content-Type": "application/json"})
    assert res.status_code == 413 and "request body is larger than" in res.text
    assert client.get("/healthz").status_code == 200


def test_video_decoding_has_a_frame_budget(tmp_path):
    frames = np.zeros((100, 16, 16, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(100, dtype=np.uint8)[:, None, None] * 2
    path = tmp_path / "ten_seconds.mp4"
    write_video(path, frames, 10)
    assert len(decode_video(path, 10, max_seconds=10)) == 100
    # a budget of 2 source frames per second of max_seconds: 20 frames decoded, 2 s of output
    assert len(decode_video(path, 10, max_seconds=10, max_source_fps=2)) == 20


def test_many_frames_with_crowded_timestamps_are_served_within_the_budget(client, tmp_path):
    path = tmp_path / "crowded.mp4"
    write_video(path, np.zeros((3000, 16, 16, 3), np.uint8), 1000)  # 3000 frames in 3 s
    res = client.post("/v1/search/video", files={"file": ("crowded.mp4", path.read_bytes(), "video/mp4")})
    assert res.status_code == 200, res.text


def test_corrupt_media_errors_are_plain_words(client):
    for route, ctype in (("/v1/search/video", "video/mp4"), ("/v1/search/audio", "audio/wav")):
        res = client.post(route, files={"file": ("x", b"\x00\x01garbage" * 500, ctype)})
        detail = res.json()["detail"]
        assert res.status_code == 422 and "damaged, or in a format that cannot be decoded" in detail
        assert "Invalid data" not in detail and "Errno" not in detail and "None" not in detail


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text.replace("https://fastapi", "")
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_readyz_and_the_page_show_no_server_paths(client, served_index):
    ready = client.get("/readyz").text
    for secret in (str(served_index), str(served_index.parent), "/tmp", "/root"):
        assert secret not in ready, secret
    assert "fingerprint" in client.get("/readyz").json()["encoder"]


def test_admin_is_closed_without_a_key(client):
    res = client.post("/v1/admin/reload")
    assert res.status_code == 403 and "DIFFGAP_ALLOW_OPEN_ADMIN" in res.text


@pytest.fixture()
def open_admin_server(served_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(served_index, copy)
    env = {"DIFFGAP_ALLOW_OPEN_ADMIN": "1", "DIFFGAP_HEADER_TIMEOUT_S": "1", "DIFFGAP_BODY_TIMEOUT_S": "2"}
    srv = Server(copy, env)
    yield srv
    srv.stop()


def test_concurrent_reloads_coalesce(open_admin_server):
    with httpx.Client(base_url=open_admin_server.url, timeout=120) as c:
        gen0 = c.post("/v1/admin/reload").json()["generation"]
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda _: c.post("/v1/admin/reload"), range(20)))
        assert all(r.status_code == 200 for r in replies)
        generations = {r.json()["generation"] for r in replies}
        assert len(generations) < 20 and min(generations) > gen0  # shared, and each began after its ask
        assert c.post("/v1/search", json={"text": "a beep", "k": 2}).status_code == 200


@pytest.mark.slow  # ~80 s: 200 sequential reloads, the slowest test of the default suite before it moved here
def test_memory_stays_flat_over_200_reloads(open_admin_server):
    srv = open_admin_server
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for _ in range(10):
            c.post("/v1/admin/reload")
        after_10 = rss_mb(srv.proc.pid)
        for _ in range(190):
            assert c.post("/v1/admin/reload").status_code == 200
        after_200 = rss_mb(srv.proc.pid)
        assert c.post("/v1/search", json={"text": "a beep", "k": 2}).status_code == 200
    assert after_200 - after_10 < 50, (after_10, after_200)


def test_slow_headers_and_slow_bodies_are_cut_off(open_admin_server):
    host, port = "127.0.0.1", open_admin_server.port
    with socket.create_connection((host, port)) as slow_headers:
        slow_headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        slow_headers.settimeout(10)
        t0 = time.monotonic()
        assert slow_headers.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 8
    with socket.create_connection((host, port)) as slow_body:
        slow_body.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        slow_body.settimeout(10)
        reply = slow_body.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]


def test_a_hard_link_to_a_file_outside_the_corpus_is_not_served(served_index, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(served_index, copy)
    corpus = Path(json.loads((copy / "manifest.json").read_text())["corpus_root"])
    private = tmp_path / "corpus"
    shutil.copytree(corpus, private)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["corpus_root"] = str(private)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    victim = sorted(private.iterdir())[0]
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"secret " * 1000)
    srv = Server(copy)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            hits = c.post("/v1/search", json={"text": "a", "k": 30}).json()["results"]
            item = next(h["id"] for h in hits if h["path"] == victim.name)
            assert c.get(f"/v1/items/{item}/audio", params={"full": "true"}).status_code == 200
            victim.unlink()
            os.link(outside, victim)  # the indexed name now points at another file's bytes
            for params in ({"full": "true"}, {}):
                res = c.get(f"/v1/items/{item}/audio", params=params)
                assert res.status_code == 409 and "changed since it was indexed" in res.text
                assert b"secret" not in res.content
    finally:
        srv.stop()


def test_an_unexpected_error_is_one_log_line_with_a_request_id(served_index, caplog):
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(index_dir=served_index))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    caplog.set_level(logging.DEBUG, logger="diffgap.serve")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        res = httpx.get(f"http://127.0.0.1:{port}/boom", headers={"X-Request-ID": "req-42"}, timeout=10)
        assert res.status_code == 500 and res.json()["request_id"] == "req-42"
        assert res.headers["X-Request-ID"] == "req-42" and "a bug" not in res.text
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "req-42" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is None  # one line; the traceback only at debug
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)


def test_without_hf_hub_offline_missing_weights_fail_fast_and_say_how_to_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DIFFGAP_DOWNLOAD", raising=False)
    with pytest.raises(EncoderLoadError, match="--download"):
        load_encoders("clap:no-such-org/no-such-clap-model", need_text=False)
