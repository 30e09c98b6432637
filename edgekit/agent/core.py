"""The on-device agent: ``Agent.open(state_dir)``, ``install``, ``infer``, ``status``.

It serves the verified bundle in the active slot with the best runtime present, watches latency and drift,
adapts (forward-only first, when drift is detected), queues a budgeted selection of samples for upload, and
installs updates into the inactive slot with a probation that commits or rolls back on the device.
It never stops serving: a failing new model is rolled back and the request is answered by the previous one.
No torch here (tier (b) adaptation imports it lazily where it exists).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.agent import backends
from edgekit.agent.adapt import AdaptState, Guard, InputWindow, Lame, NormAdapter
from edgekit.agent.config import AgentConfig
from edgekit.agent.monitor import SKETCH_FILE, Monitor, Sketch
from edgekit.agent.normtable import ADAPT_FILE, load_table
from edgekit.agent.probation import Probation
from edgekit.agent.sampler import Sampler
from edgekit.agent.scores import entropy, input_moments, output_scores, softmax
from edgekit.agent.select import Selector, day_of
from edgekit.agent.state import State
from edgekit.agent.updater import Slotted
from edgekit.agent.uploads import UploadWriter
from edgekit.bundle import OpenedBundle
from edgekit.errors import AgentError, EdgekitError, UpdateError
from edgekit.iospec import TensorSpec

log = logging.getLogger(__name__)

FLUSH_EVERY = 2000  # requests between writes of the request counters (a power loss loses at most these counts)
FLUSH_SECONDS = 30.0  # ... or this long, whichever comes first
OBSERVE_BATCH = 32  # watched requests whose scores go to the monitor together


@dataclass
class Served:
    """The model a slot holds, opened for serving."""

    slot: str
    bundle: OpenedBundle
    runtime: object
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    task: str | None
    sketch: Sketch | None
    layers: list = field(default_factory=list)
    adapter: NormAdapter | None = None

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    @property
    def version(self):
        return self.manifest.get("version")

    @property
    def sha(self) -> str:
        return self.manifest["artifact"]["sha256"]

    @functools.cached_property
    def classifier(self) -> bool:
        return self.task == "classification"

    @functools.cached_property
    def artifact_bytes(self) -> bytes:
        """The artifact, read once: adaptation updates rebuild sessions from it."""
        return (self.bundle.root / self.manifest["artifact"]["path"]).read_bytes()

    @functools.cached_property
    def first_output(self) -> str:
        return self.outputs[0].name if self.outputs else self.runtime.output_names[0]

    @functools.cached_property
    def checks(self) -> list[tuple[str, np.dtype, int, tuple[int, ...] | None, tuple[tuple[int, int], ...]]]:
        """Per input, prepared once for the request path: name, dtype, rank, the dimensions after the first when
        they are all fixed (one tuple comparison per request), else the fixed dimensions as (axis, size)."""
        out = []
        for s in self.inputs:
            fixed = tuple((i, d) for i, d in enumerate(s.shape) if isinstance(d, int))
            tail = tuple(s.shape[1:]) if all(isinstance(d, int) for d in s.shape[1:]) else None
            out.append((s.name, s.np_dtype, len(s.shape), tail, () if tail is not None else fixed))
        return out

    @functools.cached_property
    def tap_columns(self) -> tuple[int, int, int]:
        """Where a classifier's tap row holds logsumexp, sum(p z) and argmax."""
        return self.taps.column("lse"), self.taps.column("sum_pz"), self.taps.column("argmax")



_OPEN_AGENTS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _finish_background_work() -> None:
    """Background threads running ONNX Runtime must not be cut off at interpreter exit (it aborts the process)."""
    for agent in list(_OPEN_AGENTS):
        agent.wait_adaptation(timeout=60)
        agent.upload_writer.drain()


class Agent:
    def __init__(self, root: Path, config: AgentConfig, *, boot: bool = True) -> None:
        self.root = Path(root)
        self.config = config
        self.state = State(self.root)
        self.slots = Slotted(self.state, trusted_keys=config.public_keys())
        self._lock = threading.RLock()
        self._install_lock = threading.Lock()
        self.model: Served | None = None
        self.monitor = Monitor(None, config.monitor)
        self.selector = Selector(config.select)
        self.window = InputWindow(config.adapt_window)
        self.lame = Lame(config.adapt_window)
        self.adapt_state = AdaptState()
        self.guard = Guard(config.guard, None, None)
        self.probation: Probation | None = None
        self._pending = {"errors": 0, "skipped": 0, "nonfinite_inputs": 0, "nonfinite_outputs": 0}
        self._requests = 0  # answered since the last flush (an int: the request path counts it)
        self.upload_writer = UploadWriter(self.state, config.select.budget_bytes_per_day)
        # watched requests not yet scored: logits copies, input moments (mean, std, finite), output-finite flags
        self._rows: list[np.ndarray] = []
        self._moments: list = []
        self._outputs_ok: list[bool] = []
        self._watched_count = 0
        self._adapting: threading.Thread | None = None
        self._adapt_not_before = 0.0
        self._flushed_at = time.monotonic()
        # per-request switches, fixed by the config
        self._lame_on = "lame" in config.adapt
        self._adapt_on = bool({"norm", "tent"} & set(config.adapt)) and config.adapt_when != "never"
        self._upload_on = config.upload
        self._check_inputs = config.check_inputs
        self._skip_on = config.skip_similar is not None
        self._adapt_always = config.adapt_when == "always"
        # optional per-request work, on a sample of the requests within a share of the run time
        self._watch = Sampler(config.monitor.every, config.monitor.time_share)
        self._rand = random.Random(1).random  # the request path's draws for both samplers
        self._select_sampler = Sampler(config.select.every, config.select.time_share, seed=2)
        self._since_adapt = 0
        self._last_input: np.ndarray | None = None
        self._last_output: dict | None = None
        self._warned_torch = False
        self._skip_rng = np.random.default_rng(0)
        _OPEN_AGENTS.add(self)
        slots, opened = self.slots.recover(count_boot=boot)
        if opened is not None:
            self._serve(self._open(slots.active, opened), restore=True)
            if slots.probation is not None:
                self._start_probation(slots.previous)

    @classmethod
    def open(cls, state_dir: str | Path, config: AgentConfig | None = None, *, boot: bool = True) -> Agent:
        """Open (or create) the agent state in ``state_dir``. A config given here is saved there for the next
        start; without one the saved config (or the defaults) is used. ``boot=False`` for short-lived tools
        (status, install from the command line): they do not count as a restart during probation."""
        root = Path(state_dir)
        if config is None:
            config = AgentConfig.load(root)
        else:
            config.save(root)
        return cls(root, config, boot=boot)

    def close(self) -> None:
        """Finish background work (adaptation, queued uploads), write the counters, close the state."""
        self.wait_adaptation()
        self.upload_writer.close()
        with self._lock:
            if self._watched_count:
                self._observe()
            self._flush()
            self.state.close()

    # -- loading -------------------------------------------------------------------------------------------
    def _open(self, slot: str, bundle: OpenedBundle) -> Served:
        m = bundle.manifest
        files = {e["path"] for e in m.get("files", [])}
        sketch = Sketch.load(bundle.root / SKETCH_FILE) if SKETCH_FILE in files else None
        layers = load_table(bundle.root / ADAPT_FILE) if ADAPT_FILE in files else []
        return Served(slot=slot, bundle=bundle, runtime=None,
                      inputs=tuple(TensorSpec.from_dict(d) for d in m.get("inputs", [])),
                      outputs=tuple(TensorSpec.from_dict(d) for d in m.get("outputs", [])),
                      task=m.get("task"), sketch=sketch, layers=layers)

    def _feature(self, served: Served) -> str | None:
        """The penultimate-feature output LAME uses (None: it uses the logits)."""
        if "lame" not in self.config.adapt or served.sketch is None:
            return None
        return served.sketch.feature

    def _runtime(self, served: Served, overrides=None):
        cfg = self.config
        feature = self._feature(served)
        try:
            return backends.open_runtime(served.manifest, served.bundle.root, providers=cfg.providers,
                                         threads=cfg.threads, overrides=overrides,
                                         cache_dir=self.root / "engines", extra_outputs=[feature] if feature else ())
        except EdgekitError:
            raise
        except Exception as exc:
            raise AgentError(f"cannot open the model in slot {served.slot}: {exc}") from exc

    def _serve(self, served: Served, *, restore: bool = False) -> None:
        """Make ``served`` the serving model (adaptation restored from the state if it belongs to it)."""
        self.adapt_state = AdaptState()
        if restore and served.layers:
            saved = self.state.latest_adapt(served.sha)
            if saved is not None:
                version, reason, arrays = saved
                self.adapt_state = AdaptState.from_npz_dict(arrays, version, reason)
        served.runtime = self._runtime(served, self._overrides(served, self.adapt_state))
        self.model = served
        self.monitor.reset(served.sketch)
        self._rows, self._moments, self._outputs_ok, self._watched_count = [], [], [], 0
        self.window.clear()
        self.lame.reset()
        ref_e = served.sketch.median("entropy") if served.sketch else None
        ref_share = max(served.sketch.classes) if served.sketch and served.sketch.classes else None
        self.guard = Guard(self.config.guard, ref_e, ref_share)
        log.info("serving %s version %s from slot %s (%s)", served.manifest.get("name"), served.version,
                 served.slot, ", ".join(getattr(served.runtime, "providers", [served.runtime.name])))

    def _overrides(self, served: Served, state: AdaptState):
        if state.is_source() or not served.layers:
            return None
        return self._adapter(served).overrides(state)

    def _adapter(self, served: Served) -> NormAdapter:
        if served.adapter is None:
            import onnx

            model = onnx.load_from_string(served.artifact_bytes)
            batched = all(isinstance(s.shape[0], str) for s in served.inputs if s.shape)
            served.adapter = NormAdapter(model, served.layers, prior=self.config.adapt_prior, batched=batched)
        return served.adapter

    # -- install / rollback --------------------------------------------------------------------------------------
    def pause_uploads(self, paused: bool = True) -> None:
        """Stop (or resume) selecting samples for upload, e.g. while the device's accuracy is being measured on data
        that must not reach the cloud. Resuming keeps ``config.upload``'s say."""
        self._upload_on = self.config.upload and not paused

    def install(self, source: str | Path, *, probation: bool = True) -> dict:
        """Verify a bundle (path or URL), install it into the inactive slot and switch to it. With a model already
        serving, the new one is on probation for ``config.probation.requests`` requests (see ``Probation``)."""
        from edgekit.delta import DeltaBaseMismatch

        with self._install_lock:
            try:
                staged, opened = self.slots.stage(source)
            except DeltaBaseMismatch as exc:
                if not exc.full:
                    raise
                log.warning("%s; installing the full bundle %s instead", exc.message, exc.full)
                staged, opened = self.slots.stage(exc.full)
            active = self.model
            if active is not None and opened.manifest["artifact"]["sha256"] == active.sha:
                import shutil

                shutil.rmtree(staged.parent, ignore_errors=True)
                return {"installed": False, "reason": "already serving this model", "version": active.version}
            candidate = self._open("staged", opened)
            try:
                candidate.runtime = self._runtime(candidate)
                _smoke_test(candidate)
            except EdgekitError as exc:
                import shutil

                shutil.rmtree(staged.parent, ignore_errors=True)
                self.state.event("install-refused", f"version {opened.manifest.get('version')}: {exc.message}")
                raise UpdateError(f"the new model does not run here: {exc.message}",
                                  hint="the serving model is unchanged") from None
            slot = self.slots.place(staged)
            served = self._open(slot, self.slots.open_slot(slot))
            with self._lock:
                on_probation = probation and active is not None
                self.slots.switch(slot, served.version, probation=on_probation)
                self.state.clear_adapt()
                previous = self.model
                self._serve(served)
                self.probation = None
                if on_probation:
                    self.probation = Probation(self.config.probation, previous, _expected_agreement(served))
            log.info("installed version %s into slot %s%s", served.version, slot,
                     " (on probation)" if on_probation else "")
            return {"installed": True, "slot": slot, "version": served.version, "probation": on_probation}

    def _start_probation(self, previous_slot: str | None) -> None:
        if previous_slot is None:
            self.slots.commit("no previous model to compare with")
            return
        try:
            prev = self._open(previous_slot, self.slots.open_slot(previous_slot))
            prev.runtime = self._runtime(prev)
        except EdgekitError as exc:
            self.slots.commit(f"previous model unusable ({exc.message}); keeping the new one")
            return
        self.probation = Probation(self.config.probation, prev, _expected_agreement(self.model))

    def rollback(self, reason: str = "requested") -> dict:
        with self._lock:
            slots = self.slots.rollback(reason)
            served = self._open(slots.active, self.slots.open_slot(slots.active))
            self.state.clear_adapt()
            self._serve(served)
            self.probation = None
            self.state.bump("rollbacks")
            log.warning("rolled back to version %s: %s", served.version, reason)
            return {"slot": slots.active, "version": served.version, "reason": reason}

    # -- inference ---------------------------------------------------------------------------------------------
    def _check(self, feeds: Mapping[str, np.ndarray], served: Served) -> Mapping[str, np.ndarray]:
        """The feeds as arrays of the model's dtypes and shapes (and, with ``check_inputs``, finite). The common
        case (arrays of the right dtype and fixed trailing dimensions) takes one tight loop and returns ``feeds``."""
        checks = served.checks
        if len(feeds) == len(checks) and not self._check_inputs:
            for name, dtype, ndim, tail, _ in checks:
                x = feeds.get(name)
                if type(x) is not np.ndarray or x.dtype is not dtype or x.shape[1:] != tail or x.ndim != ndim:
                    break
            else:
                return feeds
        return self._check_each(feeds, served)

    def _check_each(self, feeds: Mapping[str, np.ndarray], served: Served) -> dict[str, np.ndarray]:
        checks = served.checks
        if len(feeds) != len(checks):
            raise AgentError(f"the model takes inputs {[c[0] for c in checks]}, got {sorted(feeds)}")
        out = {}
        for name, dtype, ndim, tail, fixed in checks:
            try:
                x = feeds[name]
                if type(x) is not np.ndarray or x.dtype != dtype:
                    x = np.asarray(x, dtype=dtype)
            except KeyError:
                raise AgentError(f"the model takes inputs {[c[0] for c in checks]}, got {sorted(feeds)}") from None
            except (TypeError, ValueError) as exc:
                raise AgentError(f"input {name!r} is not a {dtype} array: {exc}") from None
            shape = x.shape
            if len(shape) != ndim or (shape[1:] != tail if tail is not None else any(shape[i] != d for i, d in fixed)):
                spec = next(s for s in served.inputs if s.name == name)
                raise AgentError(f"input {name!r} has shape {list(shape)}; the model takes {list(spec.shape)}")
            if self._check_inputs and dtype.kind == "f":
                v = x.reshape(-1)
                if not math.isfinite(v.dot(v)):  # one BLAS pass; NaN/Inf propagate into it
                    raise AgentError(f"input {name!r} holds NaN or Inf values (or values beyond 1e19)")
            out[name] = x
        return out

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the serving model (adaptation applied); classifier logits come back as log-probabilities when LAME
        output adaptation is on.

        Every request: the inputs' dtypes and shapes are checked (and their values, with ``check_inputs``), the
        model runs, its latency is recorded. The monitor watches a sample of the requests (``monitor.every`` and
        ``monitor.time_share``: its scores, input statistics and NaN counts cost at most that share of the run
        time) and the upload selection considers another (``select.every``, ``select.time_share``); drift tests run
        on batches of watched requests, adaptation updates in the background. During a probation every output is
        checked."""
        with self._lock:
            served = self.model
            if served is None:
                raise AgentError("no model is installed", hint="install one with `edgekit agent install BUNDLE`")
            feeds = self._check(feeds, served)
            skip = self._skip_on
            if skip:
                cached = self._skip(feeds)
                if cached is not None:
                    return cached
            t0 = time.perf_counter()
            try:
                out = served.runtime.run(feeds)
            except Exception as exc:
                return self._failed(exc, feeds)
            latency = time.perf_counter() - t0
            n = self._requests = self._requests + 1  # merged into the counters at each flush
            self.monitor.latency.append(latency * 1e3)
            if self.probation is not None:
                if not self._probation_step(served, feeds, out, latency):
                    return self.infer(feeds)  # rolled back: the previous model answers
            first = out[served.first_output]
            watch = self._watch
            if watch.p >= 1.0 or self._rand() < watch.p:  # Sampler.due, inlined: the request path
                t1 = time.perf_counter()
                self._watched(served, feeds, first)
                watch.ran(time.perf_counter() - t1, latency)
            if served.classifier:
                sel = self._select_sampler
                if self._upload_on and (sel.p >= 1.0 or self._rand() < sel.p) and self.upload_writer.open_today():
                    t1 = time.perf_counter()
                    self._select(served, feeds, first)
                    sel.ran(time.perf_counter() - t1, latency)
                if self._lame_on:
                    feature = self._feature(served)
                    probs = self.lame(first, out.pop(feature) if feature in out else None)
                    out[served.first_output] = np.log(np.clip(probs, 1e-12, 1.0)).astype(np.float32)
                if self._adapt_on and served.layers and (self.monitor.drifting or self._adapt_always
                                                         or not self.adapt_state.is_source()):
                    self._adapt_step(served, feeds)
            if n >= FLUSH_EVERY or (n % 64 == 0 and time.monotonic() - self._flushed_at > FLUSH_SECONDS):
                self._flush()
            if skip:
                self._last_output = out
            return out

    def _probation_step(self, served: Served, feeds, out, latency: float) -> bool:
        """During a probation every output is checked: NaN/Inf from finite inputs fails the new model (False: it
        was rolled back, and the request must be answered again)."""
        first = out[served.first_output]
        if first.dtype.kind == "f" and not math.isfinite(first.sum()):
            for name, x in feeds.items():
                if x.dtype.kind == "f" and not np.isfinite(x).all():
                    raise AgentError(f"input {name!r} holds NaN or Inf values")
            self._pending["errors"] += 1
            self.rollback("inference failed on probation: the model produced NaN/Inf")
            return False
        verdict = self.probation.observe(feeds, out, latency * 1e3, served.first_output, served.classifier)
        if verdict is not None:
            self._decide(verdict)
        return True

    def _watched(self, served: Served, feeds, first: np.ndarray) -> None:
        """Record a watched request: a copy of a classifier's logits (or whether another model's output is finite)
        and the moments of its first float input. They are scored in batches (``_observe``)."""
        if served.classifier:
            self._rows.append(np.array(first, np.float64).reshape(len(first), -1))
        elif first.dtype.kind == "f":
            ok = math.isfinite(first.sum())
            self._outputs_ok.append(ok)
        x = next((v for v in feeds.values() if v.dtype.kind == "f"), None)
        if x is not None:
            self._moments.append(input_moments(x))
        self._watched_count += 1
        if self._watched_count >= OBSERVE_BATCH:
            self._observe()

    def _observe(self) -> None:
        """The watched requests' scores go to the monitor and the guard; NaN/Inf inputs and outputs are counted."""
        scores: dict[str, np.ndarray] = {}
        if self._moments:
            finite = np.concatenate([np.full(len(m), f) for m, _, f in self._moments])
            mean = np.concatenate([m for m, _, _ in self._moments])[finite]
            std = np.concatenate([s for _, s, _ in self._moments])[finite]
            self._pending["nonfinite_inputs"] += int((~finite).sum())
            scores.update(input_mean=mean, input_std=std, input_rms=np.sqrt(mean * mean + std * std))
        bad_out = self._outputs_ok.count(False)
        if self._rows:
            z = np.concatenate(self._rows)
            ok = np.isfinite(z).all(axis=1)
            bad_out += int((~ok).sum())
            z = z[ok]
            if len(z):
                scores.update(output_scores(z))
                if not self.adapt_state.is_source():  # collapse can only follow adaptation
                    self.guard.observe(scores["entropy"], z.argmax(axis=1))
        self._pending["nonfinite_outputs"] += bad_out
        self._rows, self._moments, self._outputs_ok, self._watched_count = [], [], [], 0
        self.monitor.observe_scores(scores)
        if not self.adapt_state.is_source():
            reason = self.guard.collapsed()
            if reason is not None:
                self.reset_adaptation(reason)

    def _skip(self, feeds) -> dict | None:
        """Near-duplicate frames (optional): StreamDiffusion's stochastic similarity filter. With cosine ``c`` between
        this input and the last one that was run, the last answer is reused with probability
        ``(c - threshold) / (1 - threshold)``, so a static scene is skipped while slow changes still get through."""
        thr = self.config.skip_similar
        if thr is None or len(feeds) != 1:
            return None
        x = next(iter(feeds.values())).astype(np.float64).ravel()
        last = self._last_input
        if last is None or self._last_output is None or last.shape != x.shape:
            self._last_input = x
            return None
        cos = float(x @ last / (np.linalg.norm(x) * np.linalg.norm(last) + 1e-12))
        if cos <= thr or self._skip_rng.random() >= (cos - thr) / (1 - thr + 1e-12):
            self._last_input = x
            return None
        self._pending["skipped"] += 1
        return {k: v.copy() for k, v in self._last_output.items()}

    def _failed(self, exc: Exception, feeds) -> dict[str, np.ndarray]:
        self._pending["errors"] += 1
        msg = exc.message if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
        log.error("inference failed: %s", msg)
        if self.probation is not None:  # the new model fails: back to the previous one, and answer with it
            self.rollback(f"inference failed on probation: {msg}")
            return self.infer(feeds)
        raise AgentError(f"inference failed: {msg}")

    def _decide(self, verdict: tuple[bool, str]) -> None:
        ok, detail = verdict
        self.probation = None
        if ok:
            self.slots.commit(detail)
            log.info("probation passed: %s", detail)
        else:
            self.rollback(f"probation failed: {detail}")

    def _select(self, served: Served, feeds, logits: np.ndarray) -> None:
        """Upload selection of this request's first sample: the entropy band, then the redundancy test, then the
        hand-over to the upload writer (which copies the sample)."""
        z = np.asarray(logits, np.float64).reshape(len(logits), -1)[:1]
        if not np.isfinite(z).all():
            return
        p = softmax(z)
        e = float(entropy(p)[0])
        if not self.selector.admit(e):
            return
        sample = {k: v[:1] for k, v in feeds.items()}
        feature = self.selector.novel(sample)
        if feature is None:
            return
        meta = {"entropy": e, "prediction": int(p[0].argmax()), "version": served.version}
        if self.upload_writer.submit(sample, meta, served.sha):
            self.selector.accepted(feature)

    def _adapt_step(self, served: Served, feeds) -> None:
        when = self.config.adapt_when
        # "drift": adaptation starts with the drift alarm and then goes on (the adapted model's own scores no longer
        # compare with the source's reference, so the alarm cannot tell when to stop); collapse resets it.
        if when == "never" or (when == "drift" and self.adapt_state.is_source() and not self.monitor.drifting):
            return
        n = len(next(iter(feeds.values())))
        for i in range(n):  # the window fills only while adaptation can follow
            self.window.add({k: v[i:i + 1] for k, v in feeds.items()})
        self._since_adapt += n
        if self._since_adapt < self.config.adapt_every or len(self.window) < self.config.adapt_min_samples:
            return
        if self._adapting is not None and self._adapting.is_alive():
            return  # one update at a time; this one starts after it
        if time.perf_counter() < self._adapt_not_before:
            return  # duty cycle: updates take at most ``adapt_duty`` of the time
        self._since_adapt = 0
        window = InputWindow(self.config.adapt_window)
        for sample in self.window.samples():
            window.add(sample)
        state = self.adapt_state
        if self.config.adapt_async:
            self._adapting = threading.Thread(target=self._update, args=(served, state, window),
                                              name="edgekit-adapt", daemon=True)
            self._adapting.start()
        else:
            self._update(served, state, window)

    def _update(self, served: Served, state: AdaptState, window: InputWindow) -> None:
        """One adaptation update (in the background by default); the new session is swapped in under the lock."""
        t0 = time.perf_counter()
        try:
            new = self._adapter(served).update(state, window) if "norm" in self.config.adapt else state
            if "tent" in self.config.adapt:
                new = self._tent(served, new, window)
            runtime = self._runtime(served, self._overrides(served, new))
        except Exception as exc:  # noqa: BLE001 - adaptation must never stop serving
            log.warning("adaptation update failed (%s); keeping the current model", exc)
            return
        took = time.perf_counter() - t0
        with self._lock:
            if self.config.adapt_async:  # inside requests (sync) the cadence is adapt_every alone: reproducible
                self._adapt_not_before = time.perf_counter() + took * (1 / self.config.adapt_duty - 1)
            if self.model is not served or self.adapt_state is not state:
                return  # the model changed or adaptation was reset meanwhile
            served.runtime = runtime
            self.adapt_state = new
            self.state.save_adapt(new.version, served.sha, new.reason, new.to_npz_dict())

    def wait_adaptation(self, timeout: float | None = None) -> None:
        """Wait for an adaptation update running in the background (tests, benchmarks, shutdown)."""
        t = self._adapting
        if t is not None:
            t.join(timeout)

    def _tent(self, served: Served, state: AdaptState, window: InputWindow) -> AdaptState:
        try:
            from edgekit.agent_torch.tent import adapt_entropy
        except ImportError:
            log.warning("tier (b) adaptation needs torch; using forward-only adaptation")
            return state
        model = served.artifact_bytes
        layers = [la.to_dict() for la in served.layers]
        ones = {la.name: np.ones(la.channels, np.float32) for la in served.layers}
        zeros = {la.name: np.zeros(la.channels, np.float32) for la in served.layers}
        by_tensor = {la.name: la.tensor for la in served.layers}
        scale = {by_tensor[k]: v for k, v in {**ones, **state.scale}.items()}
        shift = {by_tensor[k]: v for k, v in {**zeros, **state.shift}.items()}
        batch = window.batch()
        try:
            new_scale, new_shift, info = adapt_entropy(model, layers, scale, shift, batch)
        except ImportError as exc:  # no torch on this device: tier (a) only, said once
            if not self._warned_torch:
                log.warning("tier (b) adaptation is off: %s", exc)
                self._warned_torch = True
            return state
        except Exception as exc:  # adaptation must never stop serving
            log.warning("entropy adaptation failed (%s); keeping the forward-only state", exc)
            return state
        back = {v: k for k, v in by_tensor.items()}
        summary = f"entropy minimization on {info.get('selected')} of {info.get('samples')} samples"
        return AdaptState(state.version + 1, {back[k]: v for k, v in new_scale.items()},
                          {back[k]: v for k, v in new_shift.items()}, summary)

    def reset_adaptation(self, reason: str) -> None:
        """Back to the source model's parameters."""
        with self._lock:
            served = self.model
            self.adapt_state = AdaptState(self.adapt_state.version + 1, reason=f"reset: {reason}")
            if served is not None:
                served.runtime = self._runtime(served)
            self.window.clear()
            self.lame.reset()
            self.guard.reset()
            self.state.clear_adapt()
            self.state.event("adapt-reset", reason)
            self.state.bump("adapt_resets")
            log.warning("adaptation reset to the source model: %s", reason)

    # -- reporting -----------------------------------------------------------------------------------------------
    def _flush(self) -> None:
        pending, self._pending = self._pending, {k: 0 for k in self._pending}
        pending["requests"], self._requests = self._requests, 0
        self._flushed_at = time.monotonic()
        self.state.bump_many(pending)

    def status(self) -> dict:
        self.upload_writer.drain()
        with self._lock:
            self._flush()
            served = self.model
            slots = self.state.slots()
            model = None
            if served is not None:
                model = {"name": served.manifest.get("name"), "version": served.version, "slot": served.slot,
                         "sha256": served.sha, "task": served.task, "target": served.manifest.get("target"),
                         "runtime": served.runtime.name,
                         "providers": list(getattr(served.runtime, "providers", [])),
                         "signature": served.bundle.signature.detail}
            return {
                "model": model,
                "slots": {"active": slots.active, "previous": slots.previous,
                          "probation": None if self.probation is None else self.probation.summary()},
                "latency_ms": self.monitor.latency_percentiles(),
                "drift": {"alarm": self.monitor.drifting, "scores": self.monitor.drift(),
                          "reference": served is not None and served.sketch is not None},
                "adaptation": {"tiers": list(self.config.adapt), "when": self.config.adapt_when,
                               "version": self.adapt_state.version, "state": self.adapt_state.reason,
                               "layers": 0 if served is None else len(served.layers)},
                "queue": {"size": self.state.queue_size(), "bytes_today": self.state.budget_used(day_of()),
                          "budget_per_day": self.config.select.budget_bytes_per_day, **self.selector.stats,
                          **self.upload_writer.stats},
                "counters": self.state.counters(),
                "events": self.state.events(10),
            }

    def uploads(self, limit: int = 100) -> list[dict]:
        """Queued samples, oldest first (``payload`` is an npz of the inputs); ``ack`` them once uploaded."""
        return self.state.pending(limit)

    def ack(self, ids) -> int:
        return self.state.ack(ids)


def _smoke_test(served: Served) -> None:
    """Run the new model once on a zero input of its declared shape (batch 1) and check the outputs."""
    feeds = {}
    for spec in served.inputs:
        shape = [1 if not isinstance(d, int) else d for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, spec.np_dtype)
    try:
        out = served.runtime.run(feeds)
    except Exception as exc:
        raise UpdateError(f"the model fails on a test input: {exc}") from None
    for name, v in out.items():
        if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all():
            raise UpdateError(f"the model outputs NaN/Inf in {name!r} on a test input")


def _expected_agreement(served) -> float | None:  # noqa: ANN001 - Served
    """An adapted release's declared agreement with its base (``probation.Probation``), if it declares one."""
    value = (served.manifest.get("adaptation") or {}).get("expected_agreement") if served is not None else None
    return float(value) if isinstance(value, int | float) and 0 <= value <= 1 else None
