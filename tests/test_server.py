"""The HTTP service: answers, batching, every bad input, a real uvicorn process."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from test_runtime import two_tasks  # noqa: F401 - fixture

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from inca.runtime import MultiTaskModel  # noqa: E402
from inca.runtime.server import ServerConfig, create_app  # noqa: E402


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


def test_concurrent_requests_are_batched(client):
    c, _, _ = client
    before = c.get("/health").json()["batches_run"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(
            lambda i: c.post("/predict", files=[("files", (f"{i}.png", png(i * 20)))]).status_code,
            range(8)))
    assert codes == [200] * 8
    assert c.get("/health").json()["batches_run"] - before < 8


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
        assert c.post("/predict", files=[("files", ("x.png", png()))]).status_code == 401
        assert c.get("/tasks").status_code == 401
        r = c.post("/predict", files=[("files", ("x.png", png()))],
                   headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200  # probes need no key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_process(tmp_path):
    import httpx
    from tiny import save_tiny_hf_vit

    import inca
    from inca.data import load_dataset

    folder = save_tiny_hf_vit(tmp_path / "vit")
    bb = inca.create_backbone(f"hf:{folder}")
    task = inca.fit(bb, load_dataset("digits", limit=80), kinds=("linear",), layers="last",
                    lrs=(1e-2,), epochs=1, progress=False)
    task.save(tmp_path / "digits" / "task")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "inca.cli", "serve", "--task", str(tmp_path / "digits" / "task"),
         "--port", str(port), "--max-upload-mb", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.2)
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda i: httpx.post(
                f"{base}/predict", files=[("files", (f"{i}.png", png(i * 30, 8)))],
                timeout=30), range(6)))
        assert [r.status_code for r in rs] == [200] * 6
        assert rs[0].json()["predictions"][0]["tasks"]["digits"][0]["label"] in task.classes
        assert httpx.post(f"{base}/predict", content=b"x" * 20000, timeout=10,
                          headers={"content-type": "application/json"}).status_code == 413
        assert httpx.post(f"{base}/predict", files=[("files", ("a.png", b"junk"))],
                          timeout=10).status_code == 400
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
