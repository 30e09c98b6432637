"""The on-device agent: ``Agent.open(state_dir)``, ``install``, ``infer``, ``status``.

It serves the verified bundle in the active slot with the best runtime present, watches latency and drift,
adapts (forward-only first, when drift is detected), queues a budgeted selection of samples for upload, and
installs updates into the inactive slot with a probation that commits or rolls back on the device.
It never stops serving: a failing new model is rolled back and the request is answered by the previous one.
No torch here (tier (b) adaptation imports it lazily where it exists).
"""

from __future__ import annotations

import logging
import threading
import time
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
from edgekit.agent.scores import sample_scores, softmax
from edgekit.agent.select import Selector, day_of, encode_sample
from edgekit.agent.state import State
from edgekit.agent.updater import Slotted
from edgekit.bundle import OpenedBundle
from edgekit.errors import AgentError, EdgekitError, UpdateError
from edgekit.iospec import TensorSpec

log = logging.getLogger(__name__)

FLUSH_EVERY = 100  # requests between writes of the request counters (a power loss loses at most these counts)


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

    @property
    def classifier(self) -> bool:
        return self.task == "classification"


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
        self._pending = {"requests": 0, "errors": 0, "skipped": 0}
        self._since_adapt = 0
        self._last_input: np.ndarray | None = None
        self._last_output: dict | None = None
        self._warned_torch = False
        self._skip_rng = np.random.default_rng(0)
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
        with self._lock:
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

            model = onnx.load(str(served.bundle.root / served.manifest["artifact"]["path"]))
            batched = all(isinstance(s.shape[0], str) for s in served.inputs if s.shape)
            served.adapter = NormAdapter(model, served.layers, prior=self.config.adapt_prior, batched=batched)
        return served.adapter

    # -- install / rollback --------------------------------------------------------------------------------------
    def install(self, source: str | Path, *, probation: bool = True) -> dict:
        """Verify a bundle (path or URL), install it into the inactive slot and switch to it. With a model already
        serving, the new one is on probation for ``config.probation.requests`` requests (see ``Probation``)."""
        with self._install_lock:
            staged, opened = self.slots.stage(source)
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
                    self.probation = Probation(self.config.probation, previous)
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
        self.probation = Probation(self.config.probation, prev)

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
    def _check(self, feeds: Mapping[str, np.ndarray], served: Served) -> dict[str, np.ndarray]:
        names = [s.name for s in served.inputs]
        if set(feeds) != set(names):
            raise AgentError(f"the model takes inputs {names}, got {sorted(feeds)}")
        out = {}
        for spec in served.inputs:
            try:
                x = np.asarray(feeds[spec.name], dtype=spec.np_dtype)
            except (TypeError, ValueError) as exc:
                raise AgentError(f"input {spec.name!r} is not a {spec.dtype} array: {exc}") from None
            if x.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, x.shape)):
                raise AgentError(f"input {spec.name!r} has shape {list(x.shape)}; the model takes {list(spec.shape)}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise AgentError(f"input {spec.name!r} holds NaN or Inf values")
            out[spec.name] = x
        return out

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the serving model (adaptation applied); classifier logits come back as log-probabilities when LAME
        output adaptation is on."""
        with self._lock:
            served = self.model
            if served is None:
                raise AgentError("no model is installed", hint="install one with `edgekit agent install BUNDLE`")
            feeds = self._check(feeds, served)
            cached = self._skip(feeds)
            if cached is not None:
                return cached
            t0 = time.perf_counter()
            try:
                out = served.runtime.run(feeds)
                bad = [k for k, v in out.items() if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]
                if bad:
                    raise AgentError(f"the model produced NaN/Inf in {bad}")
            except Exception as exc:
                return self._failed(exc, feeds)
            latency = (time.perf_counter() - t0) * 1e3
            self._pending["requests"] += 1
            logits = out[served.outputs[0].name] if served.classifier and served.outputs else None
            if self.probation is not None:
                verdict = self.probation.observe(feeds, out, latency, served.outputs[0].name, served.classifier)
                if verdict is not None:
                    self._decide(verdict)
            self.monitor.observe(latency, sample_scores(feeds, logits))
            if logits is not None:
                probs = softmax(logits)
                if "lame" in self.config.adapt:
                    feature = self._feature(served)
                    probs = self.lame(logits, out.pop(feature) if feature in out else None)
                    out[served.outputs[0].name] = np.log(np.clip(probs, 1e-12, 1.0)).astype(np.float32)
                self._select(feeds, probs)
                self._adapt_step(served, feeds, probs)
            if self._pending["requests"] >= FLUSH_EVERY:
                self._flush()
            self._last_output = out
            return out

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

    def _select(self, feeds, probs: np.ndarray) -> None:
        if not self.config.upload:
            return
        from edgekit.agent.scores import entropy

        served = self.model
        for i, e in enumerate(entropy(probs)):
            sample = {k: v[i:i + 1] for k, v in feeds.items()}
            feature = self.selector.consider(sample, float(e))
            if feature is None:
                continue
            meta = {"entropy": float(e), "prediction": int(np.argmax(probs[i])), "version": served.version}
            qid = self.state.enqueue(encode_sample(sample), meta, model=served.sha, day=day_of(),
                                     budget=self.config.select.budget_bytes_per_day)
            self.selector.over_budget() if qid is None else self.selector.accepted(feature)

    def _adapt_step(self, served: Served, feeds, probs: np.ndarray) -> None:
        tiers = self.config.adapt
        if not served.layers or not ({"norm", "tent"} & set(tiers)):
            return
        self.guard.observe(probs)
        for i in range(len(probs)):
            self.window.add({k: v[i:i + 1] for k, v in feeds.items()})
        self._since_adapt += len(probs)
        reason = self.guard.collapsed()
        if reason is not None and not self.adapt_state.is_source():
            self.reset_adaptation(reason)
            return
        when = self.config.adapt_when
        due = self._since_adapt >= self.config.adapt_every and len(self.window) >= self.config.adapt_min_samples
        if not due or when == "never" or (when == "drift" and not self.monitor.drifting):
            return
        self._since_adapt = 0
        adapter = self._adapter(served)
        new = adapter.update(self.adapt_state, self.window) if "norm" in tiers else self.adapt_state
        if "tent" in tiers:
            new = self._tent(served, new)
        self._apply_adaptation(served, new)

    def _tent(self, served: Served, state: AdaptState) -> AdaptState:
        try:
            from edgekit.agent.tent import adapt_entropy
        except ImportError:
            log.warning("tier (b) adaptation needs torch; using forward-only adaptation")
            return state
        model = (served.bundle.root / served.manifest["artifact"]["path"]).read_bytes()
        layers = [la.to_dict() for la in served.layers]
        ones = {la.name: np.ones(la.channels, np.float32) for la in served.layers}
        zeros = {la.name: np.zeros(la.channels, np.float32) for la in served.layers}
        by_tensor = {la.name: la.tensor for la in served.layers}
        scale = {by_tensor[k]: v for k, v in {**ones, **state.scale}.items()}
        shift = {by_tensor[k]: v for k, v in {**zeros, **state.shift}.items()}
        batch = self.window.batch()
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

    def _apply_adaptation(self, served: Served, new: AdaptState) -> None:
        try:
            runtime = self._runtime(served, self._overrides(served, new))
        except EdgekitError as exc:
            log.warning("adapted model does not load (%s); keeping the current one", exc.message)
            return
        served.runtime = runtime
        self.adapt_state = new
        self.state.save_adapt(new.version, served.sha, new.reason, new.to_npz_dict())

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
        for name, n in pending.items():
            if n:
                self.state.bump(name, n)

    def status(self) -> dict:
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
                          "budget_per_day": self.config.select.budget_bytes_per_day, **self.selector.stats},
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
