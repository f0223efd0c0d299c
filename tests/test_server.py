"""The HTTP service in-process: answers, batching, every bad input, hostile input (bombs, deep
images, chunked bodies, keys, memory). A real ``inca serve`` process: test_faults_server.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from inca.data.images import ImageError, ImageTooLargeError, open_image  # noqa: E402
from inca.errors import ServerConfigError  # noqa: E402
from inca.runtime import MultiTaskModel, memory  # noqa: E402
from inca.runtime.server import ServerConfig, create_app  # noqa: E402
from inca.task import TaskError  # noqa: E402
from inca.task.inputs import open_one as _open_image  # noqa: E402


def png(value: int = 128, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def client(two_tasks):  # noqa: F811
    bb, a, b = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a, "b": b}),
                     ServerConfig(max_upload_bytes=4096, max_wait_ms=20))
    with TestClient(app) as c:
        yield c, a, b


def test_predict_multipart_and_json_match_the_tasks(client):
    c, a, b = client
    images = [png(60), png(200)]
    r = c.post("/predict", files=[("files", ("x.png", images[0])), ("files", ("y.png",
                                                                           images[1]))],
               data={"top_k": "2"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["image"] for p in preds] == ["x.png", "y.png"]
    pil = [Image.open(io.BytesIO(x)) for x in images]
    for name, task in (("a", a), ("b", b)):
        probs = task.predict_proba(pil)
        for i in range(2):
            top = preds[i]["tasks"][name]
            assert len(top) == 2
            assert top[0]["label"] == task.classes[int(probs[i].argmax())]
            assert top[0]["probability"] == pytest.approx(float(probs[i].max()), abs=1e-5)
    r = c.post("/predict", json={"images": [base64.b64encode(images[0]).decode()],
                                 "tasks": ["b"], "top_k": 1})
    assert r.status_code == 200
    assert list(r.json()["predictions"][0]["tasks"]) == ["b"]


def test_tasks_health_openapi(client):
    c, a, _ = client
    assert c.get("/health").json()["status"] == "ok"
    tasks = c.get("/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == ["a", "b"] and tasks[0]["classes"] == a.classes
    schema = c.get("/openapi.json").json()
    assert "/predict" in schema["paths"]


def noise_png(seed: int, size: int = 16) -> bytes:
    """A random RGB image: unlike flat greys, each seed gets its own prediction."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_requests_are_batched(client):
    c, a, b = client
    images = [noise_png(i) for i in range(8)]
    pil = [Image.open(io.BytesIO(x)) for x in images]
    expected = {name: task.predict_proba(pil) for name, task in (("a", a), ("b", b))}
    for probs in expected.values():  # the images are told apart by their answers
        assert torch.cdist(probs, probs).add(torch.eye(len(probs))).min() > 1e-3
    before = c.get("/health").json()["batches_run"]

    def ask(i: int):
        return c.post("/predict", files=[("files", (f"{i}.png", images[i]))],
                      data={"top_k": "4"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [r.status_code for r in answers] == [200] * 8
    assert c.get("/health").json()["batches_run"] - before < 8  # some requests shared a pass
    for i, r in enumerate(answers):  # each answer is its own image's, not a neighbour's
        (pred,) = r.json()["predictions"]
        assert pred["image"] == f"{i}.png"
        for name, task in (("a", a), ("b", b)):
            got = {t["label"]: t["probability"] for t in pred["tasks"][name]}
            want = dict(zip(task.classes, expected[name][i].tolist(), strict=True))
            assert got == pytest.approx(want, abs=1e-5), (i, name)


@pytest.mark.parametrize("kwargs, status, message", [
    (dict(files=[("files", ("t.txt", b"hello"))]), 400, "t.txt is not a readable image"),
    (dict(files=[("files", ("cut.png", png()[:40]))]), 400, "cut.png is not a readable image"),
    (dict(files=[("files", ("big.png", os.urandom(5000)))]), 413, "over the limit"),
    (dict(data={"top_k": "1"}), 400, "no images"),
    (dict(json={"images": []}), 400, "no images"),
    (dict(json={"images": ["***"]}), 400, "not valid base64"),
    (dict(json={"images": [base64.b64encode(png()).decode()], "tasks": ["zzz"]}), 404,
     "unknown task"),
    (dict(json={"images": [base64.b64encode(png()).decode()], "top_k": "x"}), 422, "top_k"),
    (dict(content=b"raw", headers={"content-type": "text/plain"}), 415, "multipart"),
    (dict(content=b'{"images": []}', headers={"content-type": "application/jsonx"}), 415,
     "multipart"),
    (dict(content=b'{"images": []}', headers={"content-type": "APPLICATION/JSON"}), 400,
     "no images"),  # media types are case-insensitive: parsed as JSON
])
def test_bad_input_gets_a_clear_4xx_and_server_stays_up(client, kwargs, status, message):
    c, _, _ = client
    r = c.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert c.get("/health").status_code == 200
    ok = c.post("/predict", files=[("files", ("x.png", png()))])
    assert ok.status_code == 200


def test_api_key(two_tasks):  # noqa: F811
    bb, a, _ = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a}), ServerConfig(api_key="s3cret"))
    with TestClient(app) as c:
        r = c.post("/predict", files=[("files", ("x.png", png()))])
        assert r.status_code == 401
        assert r.json()["detail"] == "missing or wrong API key: send it in the X-API-Key header"
        assert c.get("/tasks").status_code == 401
        r = c.post("/predict", files=[("files", ("x.png", png()))],
                   headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert c.get("/livez").status_code == 200  # liveness needs no key
        for keys in (["s3cret", "wrong"], ["wrong", "s3cret"], ["s3cret", "s3cret"]):
            r = c.get("/tasks", headers=[("X-API-Key", k) for k in keys])
            assert r.status_code == 401, keys  # sent twice: refused, whatever the order
        for path in ("/health", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc"):
            assert c.get(path).status_code == 401, path  # everything else does
            assert c.get(path, headers={"X-API-Key": "s3cret"}).status_code in (200, 503)
        # the docs page loads its scripts from the server itself, not a CDN (blank offline)
        page = c.get("/docs", headers={"X-API-Key": "s3cret"}).text
        assert "cdn." not in page and "https://" not in page.split("<script")[1]
        script = page.split('<script src="')[1].split('"')[0]
        assert script.startswith("/") and c.get(
            script, headers={"X-API-Key": "s3cret"}).status_code == 200


# -- hostile input: bombs, deep images, chunked bodies, keys, memory, reprs -----------------
def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """PNGs of a few KB whose headers claim 144 and 196 megapixels (1-bit, all black)."""
    return {"bomb": png_bytes(Image.new("1", (12000, 12000))),  # 17 KB, 0.4 GB as RGB
            "hard": png_bytes(Image.new("1", (14000, 14000)))}  # over Pillow's hard limit


def gradient16() -> tuple[np.ndarray, bytes]:
    """A 16-bit grey gradient (v * 257 for v = 0..255) as a PNG, and its 8-bit truth."""
    v = np.tile(np.arange(256, dtype=np.uint16), (8, 1))
    return v.astype(np.uint8), png_bytes(Image.fromarray(v * 257))


def test_open_image_scales_16_bit_and_float_images():
    truth, data = gradient16()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(open_image(data, name="g16.png"))
    assert out.shape == (8, 256, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], truth)  # not saturated to white
    big_endian = Image.fromarray((truth.astype(np.uint16) * 257).astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(np.asarray(open_image(big_endian))[..., 1], truth)
    as_int = Image.fromarray(truth.astype(np.int32) * 257)  # "I" holding 16-bit data
    np.testing.assert_array_equal(np.asarray(open_image(as_int))[..., 2], truth)
    unit = Image.fromarray(truth.astype(np.float32) / 255)  # "F" in 0..1
    np.testing.assert_array_equal(np.asarray(open_image(unit))[..., 0], truth)
    wide = np.asarray(open_image(Image.fromarray(truth.astype(np.float32) * 4 - 300)))
    np.testing.assert_array_equal(wide[..., 0], truth)  # no usual range: min..max stretched


def test_open_image_refuses_bombs_before_decoding(bombs, tmp_path):
    from inca._memory import PeakMemory

    with PeakMemory() as mem, pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png is 12000x12000 = 144 "
                                                     r"megapixels, over the limit of 40 "):
            open_image(bombs["bomb"], name="bomb.png", max_pixels=40_000_000)
    assert mem.growth_mib < 50  # the header was read, the 0.4 GB of pixels never decoded
    with pytest.raises(ImageTooLargeError, match=r"hard\.png has 196 megapixels, over "
                                                 r"Pillow's limit"):
        open_image(bombs["hard"], name="hard.png")
    for bad, why in ((b"hello", "not an image format"),
                     (png_bytes(Image.new("RGB", (300, 300)))[:300], "truncated")):
        with pytest.raises(ImageError, match=why) as info:
            open_image(bad, name="x.png")
        assert "object at 0x" not in str(info.value)
    path = tmp_path / "bomb.png"
    path.write_bytes(bombs["bomb"])
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(TaskError, match="bomb"):
        _open_image(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_data_sets_skip_bombs_as_unreadable(bombs, tmp_path):
    from inca.data import load_dataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "bomb.png").write_bytes(bombs["bomb"])
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png is 12000x12000.*skip-unreadable"):
        ds = load_dataset(str(tmp_path))
        [ds[i] for i in range(len(ds))]
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        ok = load_dataset(str(tmp_path), skip_unreadable=True)
    assert ok.skipped == [str(tmp_path / "b" / "bomb.png")] and len(ok) == 4


@pytest.fixture()
def roomy(two_tasks):  # noqa: F811
    """A client with a body limit that lets bombs through, and small pixel limits."""
    bb, a, b = two_tasks
    config = ServerConfig(max_upload_bytes=2**20, max_image_pixels=10_000,
                          max_request_pixels=25_000, trim_every_bytes=100_000, max_wait_ms=1)
    app = create_app(MultiTaskModel(bb, {"a": a, "b": b}), config)
    with TestClient(app) as c:
        yield c, app, a


def test_too_many_pixels_get_413_and_the_server_keeps_serving(roomy, bombs):
    c, _, _ = roomy
    big = png_bytes(Image.new("L", (101, 100)))
    cases = [([("big.png", big)], r"big\.png is 101x100 = 0\.0101 megapixels, over the "
                                  r"limit of 0\.01 .*--max-image-megapixels"),
             ([(f"{i}.png", png(size=100)) for i in range(3)],
              r"0\.03 megapixels together, over the limit of 0\.025 per request; send "
              r"fewer or smaller images$"),
             ([("bomb.png", bombs["bomb"])], r"bomb\.png is 12000x12000"),
             ([("hard.png", bombs["hard"])], r"hard\.png has 196 megapixels")]
    for files, message in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            r = c.post("/predict", files=[("files", f) for f in files])
        assert r.status_code == 413, r.text
        assert re.search(message, r.json()["detail"]), r.json()["detail"]
        assert c.post("/predict", files=[("files", ("ok.png", png()))]).status_code == 200


def test_memory_running_short_while_decoding_fails_that_request_alone(roomy, monkeypatch):
    """Images within every limit, but memory short: 503 with Retry-After, and the next
    request is served."""
    from inca.runtime import request

    c, _, _ = roomy
    real = request.open_image

    def short(data, name, max_pixels):
        if name == "second.png":
            raise MemoryError
        return real(data, name=name, max_pixels=max_pixels)

    monkeypatch.setattr(request, "open_image", short)
    r = c.post("/predict", files=[("files", ("first.png", png())),
                                  ("files", ("second.png", png()))])
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["detail"] == ("the server ran out of memory decoding second.png; retry "
                                  "later, or send fewer or smaller images")
    monkeypatch.undo()
    assert c.post("/predict", files=[("files", ("ok.png", png()))]).status_code == 200


def test_16_bit_upload_predicts_like_its_8_bit_twin(roomy):
    c, _, a = roomy
    truth, data = gradient16()
    r16, r8 = (c.post("/predict", files=[("files", ("g.png", d))], data={"tasks": "a"})
               for d in (data, png_bytes(Image.fromarray(truth))))
    assert r16.status_code == 200, r16.text
    assert r16.json()["predictions"][0]["tasks"] == r8.json()["predictions"][0]["tasks"]


def test_chunked_body_is_cut_off_at_the_limit(two_tasks):  # noqa: F811
    bb, a, _ = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a}), ServerConfig(max_upload_bytes=4096))
    pulled, sent = [], []

    async def receive():  # 100 chunks of 1 KiB, no Content-Length
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": len(pulled) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
             "query_string": b"", "root_path": "", "server": ("test", 80),
             "client": ("test", 1), "headers": [(b"content-type", b"application/json"),
                                                (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert b"over the limit of 4096 bytes" in sent[1]["body"]
    assert len(pulled) == 5  # stopped at the first chunk past the limit, not after 100


@pytest.mark.parametrize("key", ["", "   ", " padded", "tab\there", "caf\u00e9"])
def test_unusable_api_keys_are_refused(key):
    with pytest.raises(ServerConfigError, match="API key"):
        ServerConfig(api_key=key)
    with pytest.raises(ServerConfigError, match="max_image_pixels"):
        ServerConfig(max_image_pixels=0)


def test_cli_serve_refuses_an_empty_api_key(tmp_path):
    from typer.testing import CliRunner

    from inca.cli import app

    runner = CliRunner()
    args = ["serve", "--task", str(tmp_path / "never-loaded")]
    r = runner.invoke(app, [*args, "--api-key", ""], env={"INCA_API_KEY": None})
    assert r.exit_code == 2 and "API key is empty" in r.output
    r = runner.invoke(app, args, env={"INCA_API_KEY": ""})
    assert r.exit_code == 2 and "INCA_API_KEY is set but empty" in r.output


def test_memory_is_handed_back_after_large_requests_only(roomy, monkeypatch):
    c, app, _ = roomy
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append(1) or True)
    for _ in range(3):  # 3 x 16x16x3 bytes: far below trim_every_bytes
        assert c.post("/predict", files=[("files", ("s.png", png()))]).status_code == 200
    assert calls == [] and app.state.memory.trims == 0
    files = [("files", (f"{i}.png", png(size=100))) for i in range(2)]  # 60 KB decoded
    assert c.post("/predict", files=files).status_code == 200
    assert c.post("/predict", files=files).status_code == 200  # 120 KB: one trim
    assert calls == [1] and app.state.memory.trims == 1
    monkeypatch.undo()
    assert isinstance(memory._malloc_trim(), bool)  # the real one: glibc, or a no-op


@pytest.mark.parametrize("kwargs, status, message", [
    (dict(files=[("files", ("x.png", png())), ("top_k", ("k.txt", b"3"))]), 422,
     "'top_k' must be a text field"),
    (dict(files=[("files", ("x.png", png())), ("tasks", ("t.txt", b"a"))]), 422,
     "'tasks' must be a text field"),
    (dict(data={"files": "not a file"}), 422, "'files' part 0 is a text field"),
    (dict(files=[("files", ("x.bin", b"\x00" * 64))]), 400, "x.bin is not a readable image"),
    (dict(json={"images": [{"a": 1}]}), 422, "image 0 is an object"),
    (dict(json={"images": [base64.b64encode(png()).decode()], "top_k": [1]}), 422,
     "top_k must be an integer, got a list"),
    (dict(json={"images": [base64.b64encode(png()).decode()], "tasks": {"a": 1}}), 422,
     "tasks must be a list"),
    (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=b"[" * 100_000 + b"]" * 100_000,
          headers={"content-type": "application/json"}), 400, "nested too deeply"),
    (dict(content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400, ""),
])
def test_error_messages_show_no_object_reprs(roomy, kwargs, status, message):
    c, _, _ = roomy
    r = c.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in detail
    assert not re.search(r"object at 0x|<[A-Za-z_.]+[ >]|UploadFile", detail), detail


class _SumModel:
    """Stands in for a MultiTaskModel: one 'probability' per image, its pixel sum."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def predict_proba(self, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        self.calls.append((len(images), batch_size))
        return {"t": images.sum((1, 2, 3))[:, None]}


def test_the_batcher_admits_up_to_its_limit_counts_every_waiting_image_and_runs_unbatched():
    from fastapi import HTTPException

    from inca.runtime.batcher import Batcher

    async def queued() -> None:  # batching on, no worker: admitted requests wait
        b = Batcher(_SumModel(), ServerConfig(max_images=1, max_queue_images=4))
        first = asyncio.create_task(b.predict(torch.ones(2, 3, 2, 2)))
        second = asyncio.create_task(b.predict(torch.ones(1, 3, 2, 2)))
        await asyncio.sleep(0.01)
        assert b.pending == 3
        with pytest.raises(HTTPException) as e:  # 3 + 2 > 4
            await b.predict(torch.ones(2, 3, 2, 2))
        assert e.value.status_code == 503 and e.value.headers["Retry-After"] == "1"
        assert e.value.detail == ("the server is busy (3 images are waiting for the model, the "
                                  "limit is 4); retry in 1 s")
        third = asyncio.create_task(b.predict(torch.ones(1, 3, 2, 2)))  # 3 + 1 = 4: admitted
        await asyncio.sleep(0.01)
        assert b.pending == 4 and not third.done()
        for t in (first, second, third):
            t.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)
        assert b.pending == 0

    async def unbatched() -> tuple[dict, Batcher]:
        b = Batcher(_SumModel(), ServerConfig(batching=False, max_images=4,
                                              max_queue_images=4))
        return await b.predict(torch.ones(4, 3, 2, 2)), b

    asyncio.run(queued())
    out, b = asyncio.run(unbatched())
    assert torch.equal(out["t"], torch.full((4, 1), 12.0))
    assert b.model.calls == [(4, 4)] and b.batches_run == 1 and b.pending == 0  # one pass


# -- exact answers: what a client reads, at the limits --------------------------------------
def b64png(**kwargs) -> str:
    return base64.b64encode(png(**kwargs)).decode()


USAGE = 'expected {"images": [base64 strings], "tasks": [names], "top_k": k}'
NO_IMAGES = ("the request holds no images: send one or more in 'files' (multipart) or "
             "'images' (JSON, base64)")


@pytest.mark.parametrize("kwargs, status, detail", [
    (dict(json=[1]), 422, USAGE),
    (dict(json={"images": "x"}), 422, USAGE),
    (dict(json={"images": [b64png()], "tasks": 3}), 422, f"tasks must be a list of names; {USAGE}"),
    (dict(json={"tasks": ["a"]}), 400, NO_IMAGES),  # no "images" at all: none
    (dict(json={"images": []}), 400, NO_IMAGES),
    (dict(content=b"raw", headers={"content-type": "text/plain"}), 415,
     "send multipart/form-data (field 'files') or application/json ({\"images\": [base64, "
     "...]})"),
    *[(dict(json={"images": [b64png()], "top_k": k}), 422, f"top_k must be an integer, got {d}")
      for k, d in ((True, "true"), (1.5, "1.5"), ("two", '"two"'), ([1], "a list"))],
])
def test_bad_requests_are_told_exactly_what_to_send(client, kwargs, status, detail):
    c, _, _ = client
    r = c.post("/predict", **kwargs)
    assert (r.status_code, r.json()["detail"]) == (status, detail)


@pytest.mark.parametrize("top_k, shown", [("", 3), (None, 3), (2.0, 2), ("2", 2), (1, 1)])
def test_top_k_is_a_whole_number_and_left_blank_means_three(client, top_k, shown):
    c, _, _ = client  # the tasks have 4 classes
    r = c.post("/predict", json={"images": [b64png()], "tasks": ["a"], "top_k": top_k})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["tasks"]["a"]) == shown


def test_values_in_messages_are_described_briefly():
    from inca.runtime.request import _describe

    assert _describe("x" * 38) == '"' + "x" * 38 + '"'  # 40 characters quoted: whole
    assert _describe("x" * 39) == '"' + "x" * 36 + "..."
    assert [_describe(v) for v in (None, False, 7, 0.5)] == ["null", "false", "7", "0.5"]
    assert [_describe(v) for v in ([], {}, (1,), b"1")] == [
        "a list", "an object", "a value of another kind", "a value of another kind"]


def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(client):
    c, _, _ = client  # max_upload_bytes=4096
    body = json.dumps({"images": [b64png()], "tasks": ["a"]}).encode()
    json_headers = {"content-type": "application/json"}
    r = c.post("/predict", content=body.ljust(4096), headers=json_headers)
    assert r.status_code == 200, r.text
    r = c.post("/predict", content=body.ljust(4097), headers=json_headers)
    assert (r.status_code, r.json()["detail"]) == (
        413, "request of 4097 bytes is over the limit of 4096 bytes; send fewer or smaller "
             "images")


def test_a_long_file_name_is_cut_short_in_the_answer(client):
    c, _, _ = client
    name = "n" * 300 + ".png"
    r = c.post("/predict", files=[("files", (name, png()))], data={"tasks": "a"})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["image"] == "n" * 197 + "..."


def test_an_api_key_that_headers_cannot_carry_is_refused_with_the_reason():
    with pytest.raises(ServerConfigError) as e:
        ServerConfig(api_key=" padded")
    assert str(e.value).startswith(
        "the API key must be printable ASCII without leading or trailing spaces (HTTP headers "
        "cannot carry anything else, so no client could send it); choose another key")


def test_a_refusal_is_json_with_its_length_like_every_other_answer(two_tasks):  # noqa: F811
    bb, a, _ = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a}), ServerConfig(api_key="k"))
    with TestClient(app) as c:
        refused, ok = c.get("/health"), c.get("/health", headers={"X-API-Key": "k"})
    assert (refused.status_code, ok.status_code) == (401, 200)
    assert refused.headers["content-type"] == ok.headers["content-type"] == "application/json"
    assert refused.headers["content-length"] == str(len(refused.content))
    assert refused.json() == {
        "detail": "missing or wrong API key: send it in the X-API-Key header"}


@pytest.mark.parametrize("every, trims", [(3 * 16 * 16, 1), (3 * 16 * 16 + 1, 0)])
def test_memory_is_handed_back_once_every_bytes_were_decoded(two_tasks, monkeypatch,  # noqa: F811
                                                             every, trims):
    bb, a, _ = two_tasks  # one 16 x 16 image: 768 bytes decoded (as RGB)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: True)
    app = create_app(MultiTaskModel(bb, {"a": a}),
                     ServerConfig(trim_every_bytes=every, max_wait_ms=1))
    with TestClient(app) as c:
        assert c.post("/predict", files=[("files", ("s.png", png()))]).status_code == 200
    assert app.state.memory.trims == trims


def test_a_request_of_exactly_its_pixel_limit_is_served(two_tasks):  # noqa: F811
    bb, a, _ = two_tasks
    app = create_app(MultiTaskModel(bb, {"a": a}),
                     ServerConfig(max_image_pixels=256, max_request_pixels=512, max_wait_ms=1))
    with TestClient(app) as c:
        two = [("files", (f"{i}.png", png())) for i in range(2)]  # 2 x 16 x 16 = 512
        assert c.post("/predict", files=two).status_code == 200
        r = c.post("/predict", files=[*two, ("files", ("2.png", png()))])
    assert (r.status_code, r.json()["detail"]) == (
        413, "the request's images hold 0.000768 megapixels together, over the limit of "
             "0.000512 per request; send fewer or smaller images")


def test_an_image_pillow_refuses_without_a_pixel_count_gets_413(client, monkeypatch):
    from inca.runtime import request

    def refuse(data, *, name, max_pixels):  # as Pillow's bomb check, with no "(N pixels)"
        raise ImageTooLargeError("refused", name=name, size=None, pixels=None, limit=None)

    monkeypatch.setattr(request, "open_image", refuse)
    c, _, _ = client
    r = c.post("/predict", files=[("files", ("x.png", png()))])
    assert (r.status_code, r.json()["detail"]) == (
        413, "image x.png has too many pixels, over this server's limit of 40 megapixels per "
             "image (a guard against decompression bombs); shrink the image")


class _FlakyModel(_SumModel):
    """Its first pass fails."""

    def predict_proba(self, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        if not self.calls:
            self.calls.append((0, 0))
            raise RuntimeError("the pass failed")
        return super().predict_proba(images, batch_size)


def test_a_failed_pass_fails_its_requests_with_its_error_and_the_batcher_goes_on():
    from inca.runtime.batcher import Batcher

    async def run() -> dict:
        b = Batcher(_FlakyModel(), ServerConfig(max_wait_ms=1))
        b.start()
        try:
            with pytest.raises(RuntimeError, match="^the pass failed$"):
                await asyncio.wait_for(b.predict(torch.ones(1, 3, 2, 2)), 5)
            return await asyncio.wait_for(b.predict(torch.ones(2, 3, 2, 2)), 5)
        finally:
            await b.stop()

    assert torch.equal(asyncio.run(run())["t"], torch.full((2, 1), 12.0))
