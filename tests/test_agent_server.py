"""``edgekit agent run`` over HTTP, the agent CLI, and the agent without torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from edgekit.agent import Agent, AgentConfig
from tests.agent_bundles import build_bundles, inputs
from tests.conftest import TESTS_DIR


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, test_models_importable):
    return build_bundles(tmp_path_factory.mktemp("server-bundles"))


@pytest.fixture
def server(bundles, tmp_path):
    from edgekit.agent.server import make_server

    agent = Agent.open(tmp_path / "state", AgentConfig(adapt_when="never"))
    srv = make_server(agent, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield agent, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    agent.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type")


def _post(url, body: bytes, ctype="application/json", accept=None):
    headers = {"Content-Type": ctype}
    if accept:
        headers["Accept"] = accept
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_endpoints(server, bundles):
    agent, url = server
    code, body, _ = _get(url + "/health")
    assert code == 503 and json.loads(body)["status"] == "no model"
    agent.install(bundles["v1"])
    code, body, _ = _get(url + "/health")
    assert code == 200 and json.loads(body)["model"]["version"] == 1

    x = inputs(1, seed=3)
    code, body = _post(url + "/infer", json.dumps({"inputs": {"input": x.tolist()}}).encode())
    assert code == 200
    out = np.asarray(json.loads(body)["outputs"]["output"], np.float32)
    np.testing.assert_allclose(out, agent.infer({"input": x})["output"], atol=1e-5)

    buf = io.BytesIO()
    np.savez(buf, input=x)
    code, body = _post(url + "/infer", buf.getvalue(), ctype="application/x-npz")
    assert code == 200 and np.load(io.BytesIO(body))["output"].shape == (1, 10)

    assert _post(url + "/infer", b"{not json")[0] == 400
    code, body = _post(url + "/infer", json.dumps({"inputs": {"input": [[1, 2]]}}).encode())
    assert code == 400 and "shape" in json.loads(body)["error"]
    assert _post(url + "/nope", b"{}")[0] == 404
    assert _get(url + "/nope")[0] == 404

    code, body, ctype = _get(url + "/metrics")
    text = body.decode()
    assert code == 200 and ctype.startswith("text/plain")
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics["edgekit_requests_total"] == 3 and metrics["edgekit_nonfinite_inputs_total"] == 0
    assert metrics['edgekit_model_info{name="tiny",version="1",slot="a",runtime="onnxruntime"}'] == 1
    assert "edgekit_latency_ms{quantile=\"50\"}" in metrics
    code, body, _ = _get(url + "/status")
    assert code == 200 and json.loads(body)["slots"]["active"] == "a"


def test_agent_cli(run_cli, bundles, tmp_path):
    state = tmp_path / "st"
    out = run_cli("agent", "install", bundles["v1"], "--state", state).stdout
    assert "installed version 1 into slot a" in out
    out = run_cli("agent", "install", bundles["v2"], "--state", state, "--json").stdout
    assert json.loads(out)["probation"] is True
    st = json.loads(run_cli("agent", "status", "--state", state, "--json").stdout)
    assert st["model"]["version"] == 2 and st["slots"]["probation"] is not None
    assert "serving version 1 from slot a" in run_cli("agent", "rollback", "--state", state).stdout
    res = run_cli("agent", "install", tmp_path / "missing.ekb", "--state", state, code=9)
    assert "no bundle at" in res.stderr
    res = run_cli("agent", "install", bundles["v2"], "--state", state, "--pubkey", tmp_path / "nokey.pub", code=3)
    assert "does not exist" in res.stderr


def test_agent_runs_without_torch(bundles, tmp_path):
    """Devices may not have torch: import, install, infer and report with torch (and onnxscript, and the sync
    service's packages) unimportable."""
    script = f"""
import sys
for name in ("torch", "onnxscript", "sklearn", "skimage", "fastapi", "sqlalchemy"):
    sys.modules[name] = None
import numpy as np
from edgekit.agent import Agent, AgentConfig
from edgekit.sync.client import SyncClient  # the device's sync client: no torch, no server packages
from edgekit.sync.tuf_client import ReleaseVerifier
cfg = AgentConfig(adapt_when="always", adapt_every=4, adapt=("norm", "lame", "tent"))
a = Agent.open({str(tmp_path / 'state')!r}, cfg)
a.install({str(bundles['v1'])!r})
a.install({str(bundles['v2'])!r})
rng = np.random.default_rng(0)
for _ in range(30):
    out = a.infer({{"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}})
assert np.isfinite(out["output"]).all()
a.wait_adaptation()
st = a.status()
assert st["adaptation"]["version"] > 0, st["adaptation"]
assert "torch" not in sys.modules or sys.modules["torch"] is None
print("OK", st["model"]["version"])
"""
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK 2")


def test_install_from_url_resumes_a_partial_download(bundles, tmp_path):
    """Updates can come over HTTP; an interrupted download continues with a Range request."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served_dir = bundles["v1"].parent
    ranges = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def send_head(self):
            rng = self.headers.get("Range")
            ranges.append(rng)
            if not rng:
                return super().send_head()
            start = int(rng.split("=")[1].rstrip("-"))
            data = (served_dir / self.path.lstrip("/")).read_bytes()
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            return io.BytesIO(data[start:])

    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served_dir)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        agent = Agent.open(tmp_path / "state", AgentConfig(adapt_when="never"))
        data = bundles["v1"].read_bytes()
        part = tmp_path / "state" / "downloads" / f"{bundles['v1'].name}.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[: len(data) // 2])  # a download cut off halfway
        url = f"http://127.0.0.1:{srv.server_address[1]}/{bundles['v1'].name}"
        assert agent.install(url)["version"] == 1
        assert ranges == [f"bytes={len(data) // 2}-"]
        assert not any((tmp_path / "state" / "downloads").iterdir())  # cleaned up once installed
        from edgekit.errors import UpdateError

        with pytest.raises(UpdateError, match="HTTP 404"):
            agent.install(url + ".missing")
        assert agent.status()["model"]["version"] == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_runtime_choice_for_other_formats(tmp_path):
    """TFLite needs LiteRT and TensorRT plugins need tensorrt + a GPU: without them, a clear AgentError (a
    TensorRT-ready graph without plugins falls back to ONNX Runtime: tests/test_build_tensorrt.py)."""
    from edgekit.agent.backends import open_runtime, ort_providers
    from edgekit.errors import AgentError

    assert ort_providers()[-1] == "CPUExecutionProvider"
    assert ort_providers(["NoSuchProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(AgentError, match="cannot run artifacts of format 'coreml'"):
        open_runtime({"artifact": {"format": "coreml", "path": "m"}}, tmp_path)
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        with pytest.raises(AgentError, match="LiteRT"):
            open_runtime({"artifact": {"format": "tflite", "path": "m.tflite"}}, tmp_path)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(AgentError, match="TensorRT"):
            open_runtime({"artifact": {"format": "tensorrt-onnx", "path": "m.onnx"},
                          "engine": {"plugin_library": "libedgekit_trt.so"}}, tmp_path)


def test_agent_run_reports_a_busy_port(run_cli, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        res = run_cli("agent", "run", "--state", tmp_path / "st", "--port", port, code=10)
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "another --port" in res.stderr


def test_agent_run_installs_nothing_when_it_cannot_listen(run_cli, bundles, tmp_path):
    """Found by a CLI sweep: --install committed the bundle to a slot, then the busy port failed the command."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        run_cli("agent", "run", "--state", tmp_path / "st", "--port", port, "--install", bundles["v1"], code=10)
    status = json.loads(run_cli("agent", "status", "--state", tmp_path / "st", "--json").stdout)
    assert not status.get("model"), status
