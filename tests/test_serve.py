"""`catnet serve` over real HTTP (no browser): page, samples, predictions, upload limits."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import threading
import zlib
from urllib.parse import quote

import numpy as np
import pytest
import torch
from test_predict import MeanColour, shared_tiny_run, write_tiny_video

from catnet.inference.serve import App, find_samples, make_server, png_data_url

LABELS = [f"action {i}" for i in range(6)]
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from catnet.heads import build_head
    from catnet.inference.predict import Predictor
    from catnet.video import ClipSampling, SpatialConfig

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATNET_HOME", str(home))
        torch.manual_seed(0)
        head = build_head("local", in_dim=3, num_classes=len(LABELS), num_heads=2)
        sampling, spatial = ClipSampling(4, 4, 2), SpatialConfig(40, 32, 1)
        predictor = Predictor(MeanColour(), LABELS, sampling, spatial, head=head)
        app = App(predictor, find_samples(), max_bytes=MAX_BYTES, model_name="tiny test model")
        srv = make_server(app, "127.0.0.1", 0)
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        yield srv.server_address[1], home
        srv.shutdown()
        srv.server_close()


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def upload(port, name, data, length=None):
    headers = {"X-Filename": quote(name), "Content-Type": "application/octet-stream"}
    if length is not None:  # announce more than is sent: the server must refuse from the header alone
        headers["Content-Length"] = str(length)
    return request(port, "POST", "/api/predict", body=data, headers=headers)


def decode_png(url: str) -> np.ndarray:
    """Minimal reader for the 8-bit RGB, filter-0 PNGs png_data_url writes."""
    assert url.startswith("data:image/png;base64,")
    png = base64.b64decode(url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (n,), tag = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + data)
        chunks[tag] = chunks.get(tag, b"") + data
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_png_data_url_round_trips():
    img = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(png_data_url(img)), img)


def test_page_static_files_and_no_escape(server):
    port, _ = server
    status, kind, body = request(port, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="top5"' in body
    status, kind, _ = request(port, "GET", "/static/app.js")
    assert status == 200 and "javascript" in kind
    assert request(port, "GET", "/static/../serve.py")[0] == 404
    assert request(port, "GET", "/nope")[0] == 404


def test_info_lists_the_generated_sample(server):
    port, home = server
    status, _, body = request(port, "GET", "/api/info")
    info = json.loads(body)
    assert status == 200 and info["samples"] == ["moving_square.mp4"]
    assert (home / "samples" / "moving_square.mp4").is_file()
    assert info["settings"] == {"clips": 4, "frames": 4, "crops": 1, "crop": 32}
    assert info["attention"] is True and info["max_bytes"] == MAX_BYTES


def test_predict_sample_gives_top5_timeline_and_keyframes(server):
    port, _ = server
    status, _, body = request(port, "POST", "/api/predict?sample=moving_square.mp4")
    assert status == 200, body
    r = json.loads(body)
    assert r["video"] == "moving_square.mp4"
    assert len(r["predictions"]) == 5 and {p["label"] for p in r["predictions"]} <= set(LABELS)
    assert len(r["clips"]) == 4 and sum(c["attention"] for c in r["clips"]) == pytest.approx(1, abs=1e-4)
    frames = r["keyframes"]
    assert len(frames) == 3
    att = [k["attention"] for k in frames]
    assert att == sorted(att, reverse=True) and att[0] == max(c["attention"] for c in r["clips"])
    for k in frames:
        thumb = decode_png(k["image"])
        assert thumb.shape[0] == 96 and thumb.std() > 0  # a real frame, not a blank


def test_upload_a_video(server, tmp_path):
    port, _ = server
    video = write_tiny_video(tmp_path / "mine.mp4", frames=30)
    status, _, body = upload(port, "my clip.mp4", video.read_bytes())
    assert status == 200, body
    r = json.loads(body)
    assert r["video"] == "my clip.mp4" and len(r["predictions"]) == 5 and len(r["keyframes"]) == 3


@pytest.mark.parametrize("name,data,length,code,message", [
    ("big.mp4", b"\0" * 100, MAX_BYTES + 1, 413, "limit is"),
    ("notes.txt", b"hello", None, 415, "unsupported file type"),
    ("fake.mp4", b"this is not a video at all", None, 415, "not a readable video"),
    ("empty.mp4", b"", None, 400, "empty upload"),
])
def test_bad_uploads_are_refused_with_a_message(server, name, data, length, code, message):
    port, _ = server
    status, kind, body = upload(port, name, data, length)
    assert status == code and kind == "application/json"
    assert message in json.loads(body)["error"]


def test_unknown_sample_is_404(server):
    port, _ = server
    status, _, body = request(port, "POST", "/api/predict?sample=../../etc/passwd")
    assert status == 404 and "no such sample" in json.loads(body)["error"]


def _args(*argv):
    import argparse

    from catnet.cli.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_settings_are_cheap_by_default(tmp_path, monkeypatch):
    from catnet.cli.serve import build_app

    monkeypatch.setenv("CATNET_HOME", str(tmp_path))
    (tmp_path / "more").mkdir()
    write_tiny_video(tmp_path / "more" / "extra.mp4")
    (tmp_path / "more" / "notes.txt").write_text("not listed")
    app = build_app(_args("--checkpoint", str(shared_tiny_run()), "--samples", str(tmp_path / "more")))
    info = app.info()
    # fast's budget holds all of the tiny run's views (3 clips x 3 crops of 4 frames at 32 px)
    assert info["settings"] == {"clips": 3, "frames": 4, "crops": 3, "crop": 32}
    assert info["samples"] == ["extra.mp4", "moving_square.mp4"] and info["max_bytes"] == 100 * 2**20
    assert info["attention"] is True


@pytest.mark.parametrize("argv,match", [(["--max-mb", "0"], "--max-mb"),
                                        (["--samples", "/no/such/dir"], "--samples")])
def test_cli_bad_settings_are_clear_errors(tmp_path, monkeypatch, argv, match):
    from catnet.cli.serve import build_app
    from catnet.errors import CatnetError

    monkeypatch.setenv("CATNET_HOME", str(tmp_path))
    with pytest.raises(CatnetError, match=match):
        build_app(_args("--checkpoint", str(shared_tiny_run()), *argv))


def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are (http.client would refuse or re-encode odd headers); (status, JSON body)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + b"\r\n" + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data, "empty reply"
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("length", ["\u00b2".encode("latin-1"), b"-5", b"1e3", b"12 34", b"0x10", b"",
                                    "\u0663".encode()])
def test_malformed_content_length_is_a_json_400(server, length):
    port, _ = server
    head = (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Filename: v.mp4\r\nContent-Length: " + length
            + b"\r\n")
    status, body = raw_request(port, head, b"abc")
    assert status == 400 and "malformed Content-Length" in body["error"]


def test_conflicting_content_lengths_are_refused(server):
    port, _ = server
    head = (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Filename: v.mp4\r\n"
            b"Content-Length: 3\r\nContent-Length: 4\r\n")
    status, body = raw_request(port, head, b"abcd")
    assert status == 400 and "Content-Length" in body["error"]


def test_missing_content_length_is_411(server):
    port, _ = server
    status, body = raw_request(port, b"POST /api/predict HTTP/1.1\r\nHost: x\r\nX-Filename: v.mp4\r\n")
    assert status == 411 and "Content-Length" in body["error"]


def test_absurd_geometry_upload_is_a_json_4xx(server, tmp_path):
    """A 16384 x 2 video: the video layer refuses the geometry; the page gets a JSON error naming it."""
    import av

    path = tmp_path / "tall.mkv"
    with av.open(str(path), "w") as out:
        s = out.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 16384, 2, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((2, 16384, 3), 90, np.uint8), format="rgb24")
        for _ in range(2):
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    port, _ = server
    status, kind, body = upload(port, "tall.mkv", path.read_bytes())
    assert 400 <= status < 500 and kind == "application/json"
    error = json.loads(body)["error"]
    assert "tall.mkv" in error and "16384x2" in error and "aspect ratio" in error


def test_an_internal_error_is_a_json_500_not_an_empty_reply(server, monkeypatch):
    from catnet.inference.serve import App

    def boom(self, path, name):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(App, "predict", boom)
    port, _ = server
    status, kind, body = request(port, "POST", "/api/predict?sample=moving_square.mp4")
    assert status == 500 and kind == "application/json"
    assert json.loads(body) == {"error": "internal error: RuntimeError"}


def test_a_client_that_hangs_up_mid_answer_leaves_no_traceback(server, monkeypatch, capfd):
    """The browser tab closed while a prediction ran: writing the answer fails, and the server goes on
    quietly (no "internal error" line, no socketserver traceback)."""
    import socket

    from catnet.inference.serve import App, Handler

    hung_up, handled = threading.Event(), threading.Event()
    handle = Handler.handle

    def slow_predict(self, path, name):
        hung_up.wait(30)
        return {"padding": "x" * 4_000_000}  # more than any socket buffer holds

    def handle_and_tell(self):
        try:
            handle(self)
        finally:
            handled.set()

    monkeypatch.setattr(App, "predict", slow_predict)
    monkeypatch.setattr(Handler, "handle", handle_and_tell)
    port, _ = server
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    sock.sendall(b"POST /api/predict?sample=moving_square.mp4 HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 0\r\n\r\n")
    sock.close()
    hung_up.set()
    assert handled.wait(30)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    status, _, _ = request(port, "GET", "/api/info")
    assert status == 200  # still serving


def test_sample_videos_are_served_for_the_player(server):
    port, home = server
    status, kind, body = request(port, "GET", "/samples/moving_square.mp4")
    assert status == 200 and kind == "video/mp4"
    assert body == (home / "samples" / "moving_square.mp4").read_bytes()
    assert request(port, "GET", "/samples/nope.mp4")[0] == 404


@pytest.fixture(scope="module")
def run_server(tmp_path_factory):
    """The tiny trained run (random i3d_r50: it has a feature map) with explain and 1 s windows."""
    from catnet.inference.predict import Predictor

    home = tmp_path_factory.mktemp("home-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATNET_HOME", str(home))
        predictor = Predictor.from_run(shared_tiny_run(), num_clips=4, num_crops=1)
        app = App(predictor, find_samples(), max_bytes=MAX_BYTES, model_name="tiny run", window=1.0)
        srv = make_server(app, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield srv.server_address[1]
        srv.shutdown()
        srv.server_close()


def test_answers_carry_grad_cam_overlays_and_the_label_timeline(run_server):
    status, _, body = request(run_server, "POST", "/api/predict?sample=moving_square.mp4")
    assert status == 200, body
    r = json.loads(body)
    assert [e["clip"] for e in r["explain"]] == [k["clip"] for k in r["keyframes"]]  # the same 3 clips
    for e in r["explain"]:
        img = decode_png(e["image"])
        assert img.shape == (96, 128, 3) and img.std() > 0  # the sample's frames, inlined full size
        assert np.isfinite(np.array(e["map"])).all()
    assert len(r["windows"]) == 4  # 48 frames at 12 fps, 1 s windows
    assert r["timeline"][0]["start"] == 0.0 and r["timeline"][-1]["end"] == pytest.approx(4.0)
    info = json.loads(request(run_server, "GET", "/api/info")[2])
    assert info["explain"] is True and info["window"] == {"seconds": 1.0, "hop": 1.0}


@pytest.mark.parametrize("argv,match", [(["--window", "0"], "--window"), (["--hop", "1"], "--hop needs"),
                                        (["--profile", "fast", "--crops", "2"], "--crops")])
def test_cli_bad_window_and_cost_settings(tmp_path, monkeypatch, argv, match):
    from catnet.cli.serve import build_app
    from catnet.errors import CatnetError

    monkeypatch.setenv("CATNET_HOME", str(tmp_path))
    with pytest.raises(CatnetError, match=match):
        build_app(_args("--checkpoint", str(shared_tiny_run()), *argv))
