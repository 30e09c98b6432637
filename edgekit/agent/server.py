"""``edgekit agent run``: the agent behind a small HTTP server (stdlib ``http.server``, one thread per request).

- ``POST /infer``: a JSON body ``{"inputs": {name: nested list}}`` → ``{"outputs": {name: nested list}}``; or an
  ``.npz`` body (``Content-Type: application/x-npz``) → an ``.npz`` answer.
- ``GET /health``: 200 when a model serves, 503 when none is installed.
- ``GET /metrics``: Prometheus text exposition.
- ``GET /status``: the agent's status as JSON.
Bad requests get a 4xx with a JSON ``{"error": ...}``; the server itself never stops on a request's error.
"""

from __future__ import annotations

import io
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from edgekit.errors import AgentError

log = logging.getLogger(__name__)

MAX_BODY = 64 << 20
NPZ = "application/x-npz"


def _esc(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def metrics_text(status: dict) -> str:
    """Prometheus text format (version 0.0.4) of an ``Agent.status()``."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP edgekit_{name} {help_}")
        lines.append(f"# TYPE edgekit_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"edgekit_{name}{{{lab}}} {float(value):.6g}" if lab else f"edgekit_{name} {float(value):.6g}")

    c = status["counters"]
    model = status["model"]
    metric("model_info", "gauge", "The serving model (1), by name, version and slot.",
           [({"name": model["name"], "version": model["version"], "slot": model["slot"],
              "runtime": model["runtime"]}, 1)] if model else [])
    metric("requests_total", "counter", "Inference requests answered.", [({}, c.get("requests", 0))])
    metric("errors_total", "counter", "Inference requests that failed.", [({}, c.get("errors", 0))])
    metric("skipped_total", "counter", "Near-duplicate frames answered from the last result.",
           [({}, c.get("skipped", 0))])
    metric("nonfinite_inputs_total", "counter", "Watched requests whose float input held NaN/Inf.",
           [({}, c.get("nonfinite_inputs", 0))])
    metric("nonfinite_outputs_total", "counter", "Watched requests whose output held NaN/Inf.",
           [({}, c.get("nonfinite_outputs", 0))])
    metric("rollbacks_total", "counter", "Rollbacks to the previous model.", [({}, c.get("rollbacks", 0))])
    metric("adapt_resets_total", "counter", "Adaptation resets on collapse signals.", [({}, c.get("adapt_resets", 0))])
    lat = status["latency_ms"]
    metric("latency_ms", "gauge", "Inference latency percentiles over recent requests (ms).",
           [({"quantile": q.removeprefix("p")}, v) for q, v in lat.items() if v is not None])
    drift = status["drift"]
    metric("drift_alarm", "gauge", "1 while the drift alarm is on.", [({}, int(drift["alarm"]))])
    metric("drift_ks", "gauge", "KS statistic of recent scores against the bundle's reference.",
           [({"score": k}, v["ks"]) for k, v in drift["scores"].items() if v["ks"] is not None])
    metric("adapt_version", "gauge", "Version of the adaptation state (0: source).",
           [({}, status["adaptation"]["version"])])
    q = status["queue"]
    metric("upload_queue", "gauge", "Samples waiting for upload.", [({}, q["size"])])
    metric("upload_bytes_today", "gauge", "Bytes queued for upload today (UTC).", [({}, q["bytes_today"])])
    on_probation = int(bool(status["slots"]["probation"]))
    metric("probation", "gauge", "1 while a new model is on probation.", [({}, on_probation)])
    return "\n".join(lines) + "\n"


def make_server(agent, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgekit-agent"

        def log_message(self, fmt, *args) -> None:  # through logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, doc) -> None:
            self._send(code, json.dumps(doc, default=str).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            try:
                if self.path == "/health":
                    st = agent.status()
                    ok = st["model"] is not None
                    self._json(200 if ok else 503, {"status": "ok" if ok else "no model", "model": st["model"],
                                                    "probation": st["slots"]["probation"]})
                elif self.path == "/metrics":
                    self._send(200, metrics_text(agent.status()).encode(), "text/plain; version=0.0.4")
                elif self.path == "/status":
                    self._json(200, agent.status())
                else:
                    self._json(404, {"error": f"no such endpoint {self.path}"})
            except Exception as exc:  # noqa: BLE001 - a request's failure must not stop the server
                log.exception("GET %s failed", self.path)
                self._json(500, {"error": str(exc)})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/infer":
                self._json(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if length < 0:
                self._json(411, {"error": "a Content-Length header is required"})
                return
            if length > MAX_BODY:
                self._json(413, {"error": f"request body over {MAX_BODY} bytes"})
                return
            body = self.rfile.read(length)
            npz = self.headers.get("Content-Type", "").startswith(NPZ)
            try:
                if npz:
                    with np.load(io.BytesIO(body), allow_pickle=False) as z:
                        feeds = {k: z[k] for k in z.files}
                else:
                    doc = json.loads(body)
                    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
                        raise ValueError('expected {"inputs": {name: array}}')
                    feeds = {k: np.asarray(v) for k, v in doc["inputs"].items()}
            except (ValueError, OSError) as exc:
                self._json(400, {"error": f"cannot read the request: {exc}"})
                return
            try:
                out = agent.infer(feeds)
            except AgentError as exc:
                code = 503 if "no model" in exc.message else 400 if "input" in exc.message else 500
                self._json(code, {"error": exc.message})
                return
            except Exception as exc:  # noqa: BLE001
                log.exception("inference failed")
                self._json(500, {"error": str(exc)})
                return
            if npz or self.headers.get("Accept", "").startswith(NPZ):
                buf = io.BytesIO()
                np.savez(buf, **out)
                self._send(200, buf.getvalue(), NPZ)
            else:
                self._json(200, {"outputs": {k: np.asarray(v).tolist() for k, v in out.items()}})

    return ThreadingHTTPServer((host, port), Handler)
