"""The joint option space: bit-width × channel pruning × low rank × removal, chosen per layer by the same solvers.

Precision options keep their tables (``mixed._tables``: measured output distortion; ``cost.cost_table``: exact bytes,
measured latency). Structural options add rows to the same tables:

- **Units.** Layers whose choices are tied are solved as one row: a channel group (``compress.channels``: a producer,
  its depthwise layers and the consumers of its channels) and a removable residual branch
  (``compress.graphedit``: an MBConv block, an attention or FFN sub-layer) join their layers into one unit. A layer
  tied to nothing is its own unit. A unit's options are *structures* (every group at full width; groups at reduced
  widths; the branch dropped) times the members' precision options; combinations that another combination beats in
  distortion, bytes and latency at once are left out (they can never be optimal), so rows stay small.
- **Distortion** of a unit option = the structure's distortion (the FP32 model with only that group narrowed, or only
  that branch removed, or only that layer factorized, measured with the allocation's metric on calibration samples
  the refit did not see) + the members' precision distortions. The additive model of the bits-only tables, extended.
- **Cost** of a member at a reduced width is looked up in the target's hardware table under the narrowed layer's
  signature (``edgekit hardware probe`` on a pruned model measures them); where that signature was not measured, the
  unpruned layer's measured latency is scaled by the roofline ratio (source ``scaled:``), else the roofline stands.
  Channel counts are rounded to ``profile.channel_multiple``: the block size the target's kernels prefer.
- **Low rank**: linear layers (and 1×1 convolutions outside groups) with both dimensions ≥ ``MIN_RANK_DIM`` get
  ``+r<R>`` options at fractions of the break-even rank NK/(N+K), each at the layer's float and int8 options.

``JointSpace.problem(budget)`` is an ordinary ``solvers.Problem`` over unit rows; ``JointSpace.plan(solution)`` expands
the chosen rows back to one option per layer (``w8a8+ch72``, ``w8a8d+r96``, ``drop``), which ``mixed.apply_plan``
applies (structure first, ``edgekit.structure``). The per-layer rows other than plain precisions (narrowed layers,
N:M, low rank, EoRA) are priced in ``edgekit.joint_rows``. No torch here.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from edgekit.analyze import distortion, sample_distortions
from edgekit.cost import HardwareTable, cost_table
from edgekit.inventory import LayerInfo
from edgekit.joint_rows import (  # noqa: F401 - rank_candidates, narrowed_cost, sparse_cost: re-exported
    SPARSE_PATTERNS,
    Entry,
    _eora_entries,
    _rank_entries,
    narrowed,
    narrowed_cost,
    rank_candidates,
    sparse_cost,
    sparse_eligible,
)
from edgekit.plan import LayerChoice, Plan
from edgekit.selection import Measurements, choose, plan_key
from edgekit.solvers import Problem, Solution
from edgekit.tables import Budget, CostTable, SensitivityTable

log = logging.getLogger(__name__)

KEEP_FRACTIONS = (0.875, 0.75, 0.5)  # channel-group widths tried (of the original)
MAX_STRUCTURES = 64  # per unit: beyond it, only uniform widths across the unit's groups and one group at a time


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]
    groups: tuple = ()  # compress.channels.ChannelGroup
    removable: object | None = None  # compress.graphedit.RemovableUnit whose layers are exactly this unit's


@dataclass
class JointSpace:
    units: list[Unit]
    rows: dict[str, dict[str, Entry]]  # unit name -> option name -> entry
    params: dict[str, int]
    metric: str
    structure: dict = field(default_factory=dict)  # measured structural distortions, for the report

    def problem(self, budget: Budget) -> Problem:
        names = tuple(u.name for u in self.units)
        return Problem(names, {u: tuple(self.rows[u]) for u in names},
                       {u: {o: e.distortion for o, e in self.rows[u].items()} for u in names},
                       {u: {o: e.bytes for o, e in self.rows[u].items()} for u in names},
                       {u: {o: e.latency_ms for o, e in self.rows[u].items()} for u in names},
                       self.params, budget, self.metric)

    def with_float_penalty(self, penalty_ms: float, chain: set[str]) -> JointSpace:
        """The space with every float layer of ``chain`` (layers that could take int8) charged ``penalty_ms``: what a
        float island inside an integer graph costs in layout changes and Quantize/Dequantize, which no per-layer
        timing sees. The charge is measured (``JointAllocator.allocate``), like ``mixed``'s refine rounds."""
        def charged(e: Entry) -> Entry:
            n = sum(1 for layer, o in e.choice.items() if layer in chain and o.split("+")[0] == "fp32")
            return replace(e, latency_ms=e.latency_ms + penalty_ms * n) if n else e

        return replace(self, rows={u: {o: charged(e) for o, e in row.items()} for u, row in self.rows.items()})

    def fastest(self) -> Solution:
        """Each unit's fastest option by the tables (for latency budgets the tables say are out of reach)."""
        choice = {u: min(row, key=lambda o, row=row: (row[o].latency_ms, row[o].distortion)) for u, row in
                  self.rows.items()}
        entries = [self.rows[u][o] for u, o in choice.items()]
        return Solution(choice, math.fsum(e.distortion for e in entries), sum(e.bytes for e in entries),
                        math.fsum(e.latency_ms for e in entries), 0.0, "fastest")

    def plan(self, sol: Solution, layers: list[LayerInfo], *, target: str, model_sha256: str, activations: dict,
             budget: Budget) -> Plan:
        """One LayerChoice per layer (inventory order) from the chosen unit rows, each with the unit's reason."""
        chosen: dict[str, tuple[str, str]] = {}
        for u in self.units:
            e = self.rows[u.name][sol.choice[u.name]]
            why = (f"{u.name}: distortion {e.distortion:.3g}, {e.bytes} B, {e.latency_ms:.4g} ms by the tables"
                   if len(u.layers) > 1 else f"{e.distortion:.3g} {self.metric}, {e.bytes} B, {e.latency_ms:.4g} ms")
            for layer, option in e.choice.items():
                chosen[layer] = (option, why)
        choices = tuple(LayerChoice(layer.name, chosen[layer.name][0], f"{chosen[layer.name][0]}: "
                                    f"{chosen[layer.name][1]}") for layer in layers)
        predicted = {"distortion": sol.distortion, "bytes": sol.bytes, "latency_ms": sol.latency_ms,
                     "metric": self.metric}
        from edgekit.allocate import precision_label

        return Plan(model_sha256=model_sha256, target=target, precision=precision_label(choices), layers=choices,
                    activations=dict(activations), budget={**budget.to_dict(), "predicted": predicted},
                    solver=f"joint-{sol.solver}")


# -- units ----------------------------------------------------------------------------------------------------------
STRUCTURES = frozenset({"prune", "drop", "low-rank", "compensate", "sparse"})  # the structural kinds of option


def structure_kinds(structure) -> frozenset[str]:
    """``True``: every structural kind; ``False``: none (the bits-only space); else the named kinds."""
    if structure is True:
        return STRUCTURES
    if structure is False or structure is None:
        return frozenset()
    kinds = frozenset(structure)
    unknown = kinds - STRUCTURES
    if unknown:
        raise ValueError(f"unknown structural kinds {sorted(unknown)}; known: {sorted(STRUCTURES)}")
    return kinds


def find_units(model, layers: list[LayerInfo]) -> list[Unit]:
    """Channel groups and removable branches of the graph, merged where they share layers; the rest one per layer."""
    from edgekit.compress.channels import channel_groups
    from edgekit.compress.graphedit import removable_units

    names = [layer.name for layer in layers]
    parent = {n: n for n in names}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(members) -> None:
        members = [m for m in members if m in parent]
        for m in members[1:]:
            parent[find(m)] = find(members[0])

    groups = channel_groups(model)
    branches = removable_units(model)
    for g in groups:
        union(g.layers)
    for b in branches:
        union(b.layers)
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(find(n), []).append(n)
    units = []
    for ls in members.values():
        unit_groups = tuple(g for g in groups if g.producer in ls)
        branch = next((b for b in branches if set(b.layers) == set(ls)), None)
        name = branch.name if branch is not None else (unit_groups[0].name if len(unit_groups) == 1 else ls[0])
        units.append(Unit(name if len(ls) > 1 else ls[0], tuple(ls), unit_groups, branch))
    return units


def pareto(entries: list[Entry]) -> list[Entry]:
    """The entries no other entry beats in distortion, bytes and latency at once (ties: the first kept)."""
    if len(entries) <= 1:
        return entries
    a = np.array([(e.distortion, e.bytes, e.latency_ms) for e in entries], dtype=np.float64)
    keep = []
    for i in range(len(a)):
        le = np.all(a <= a[i], axis=1)
        lt = np.any(a < a[i], axis=1)
        dominated = np.any(le & lt) or np.any(np.all(a == a[i], axis=1)[:i])
        if not dominated:
            keep.append(entries[i])
    return keep


def _combine(parts: list[list[Entry]], base_distortion: float) -> list[Entry]:
    """The cross product of members' options, pruned to its Pareto set member by member."""
    front = [Entry({}, base_distortion, 0, 0.0)]
    for options in parts:
        front = pareto([Entry({**f.choice, **o.choice}, f.distortion + o.distortion, f.bytes + o.bytes,
                              f.latency_ms + o.latency_ms) for f in front for o in options])
    return front


# -- building the space -----------------------------------------------------------------------------------------------
def _channel_options(unit: Unit, widths: dict[str, int]) -> dict[str, int | None]:
    """Per layer of a unit, the +ch<N> its options carry under ``widths`` (group name -> kept channels). A layer
    that produces (or passes through) a group speaks for that group, pruned or not; a layer that only consumes
    channels carries the width of the group it consumes (``structure._groups_to_prune`` reads it the same way)."""
    out: dict[str, int | None] = dict.fromkeys(unit.layers)
    speaks = {layer for g in unit.groups for layer in (g.producer, *g.passthrough)}
    for g in unit.groups:
        if g.name in widths:
            for layer in (g.producer, *g.passthrough):
                out[layer] = widths[g.name]
            for c in g.consumers:
                if c not in speaks:
                    out[c] = widths[g.name]
    return out


def _io_channels(unit: Unit, widths: dict[str, int], layer: str) -> tuple[int | None, int | None]:
    cin = cout = None
    for g in unit.groups:
        n = widths.get(g.name)
        if n is None:
            continue
        if layer == g.producer:
            cout = n
        if layer in g.passthrough:
            cin = cout = n
        if layer in g.consumers:
            cin = n
    return cin, cout


def _structures(unit: Unit, counts: dict[str, list[int]]) -> list[dict[str, int]]:
    """Width assignments to try for a unit: the product of its groups' widths, or (when that is too many) the same
    width fraction everywhere plus one group at a time."""
    names = [g.name for g in unit.groups]
    choices = [[None, *counts.get(n, [])] for n in names]
    if math.prod(len(c) for c in choices) <= MAX_STRUCTURES:
        combos = list(itertools.product(*choices))
    else:
        depth = max(len(c) for c in choices)
        combos = [tuple(c[min(i, len(c) - 1)] for c in choices) for i in range(depth)]
        for k, c in enumerate(choices):
            combos += [tuple(x if j == k else None for j in range(len(names))) for x in c[1:]]
    out = []
    for combo in dict.fromkeys(combos):
        out.append({n: w for n, w in zip(names, combo, strict=True) if w is not None})
    return out


def build_space(model, layers: list[LayerInfo], profile, options: dict[str, list[str]], sens: SensitivityTable,
                cost: CostTable, hardware: HardwareTable | None, sample, feeds: list[dict], *,
                structure=True, bias_correction: bool = True, progress=None, quantizer=None,
                refit_data: tuple[list[dict], list[int] | None] | None = None,
                channel_stats: dict | None = None) -> JointSpace:
    """The rows of the joint problem (see the module docstring); ``structure=False`` gives the bits-only space in
    the same form, and a set of ``STRUCTURES`` offers only those kinds. ``sample`` (a Dataset) measures structural
    distortions (samples the refit did not see: ``structure.held_out``); ``feeds`` (per-sample dicts) give channel
    importance and the inputs low-rank factors are fitted to; ``refit_data`` (feeds and their groups, default ``feeds``
    without groups: ``structure.refit_feeds``) the samples a pruned group's consumers are refit on
    (``compress.refit``), as ``structure.apply_structure`` will; ``channel_stats`` (``compress.bnstats.load``) the
    BatchNorm statistics that rank channels where they cover a group (``structure.group_importance``)."""
    from edgekit.analyze import _run
    from edgekit.compress import channels, graphedit, refit
    from edgekit.cost import layer_geometry
    from edgekit.structure import group_importance

    info = {layer.name: layer for layer in layers}
    geometry = layer_geometry(model)
    metric = sens.metric
    kinds = structure_kinds(structure)
    structure = bool(kinds)
    units = find_units(model, layers) if structure else [Unit(layer.name, (layer.name,)) for layer in layers]
    struct: dict = {"groups": {}, "drops": {}, "ranks": {}, "sparse": {}, "eora": {}}
    ref = _run(model, sample) if structure else None
    groups = [g for u in units for g in u.groups]
    importance = group_importance(model, groups, feeds, channel_stats) if groups else {}
    multiple = int(getattr(profile.hardware, "channel_multiple", None) or 1)

    def measured(edited) -> float:
        return distortion(ref, _run(edited, sample), metric)

    def precision_entries(layer: str, cin, cout, ch) -> list[Entry]:
        base = cost.entries[layer]
        row = base
        if cin is not None or cout is not None:
            new, geo = narrowed(info[layer], geometry.get(layer), cin, cout)
            row = narrowed_cost(info[layer], geometry.get(layer), new, geo, options[layer], profile, hardware, base,
                                bias_correction=bias_correction)
        suffix = f"+ch{ch}" if ch is not None else ""
        out = [Entry({layer: o + suffix}, float(sens.values[layer][o]), row[o].bytes, row[o].latency_ms)
               for o in options[layer] if o in row and o in sens.values[layer]]
        if structure and cin is None and cout is None:  # at full width: N:M, low rank and EoRA options too
            out += sparse_entries(layer, out) if "sparse" in kinds else []
            if layer not in extras:
                x = info[layer]
                extras[layer] = _rank_entries(model, x, geometry, profile, options, sens, cost, hardware, feeds,
                                              measured, struct, bias_correction) if "low-rank" in kinds else []
                extras[layer] += _eora_entries(x, geometry.get(layer), quantizer, options, sens, cost, profile,
                                               hardware, bias_correction, struct) if "compensate" in kinds else []
            out += extras[layer]
        return out

    extras: dict[str, list[Entry]] = {}

    sparse_distortion: dict[tuple[str, str], float] = {}

    def sparse_entries(layer: str, dense: list[Entry]) -> list[Entry]:
        """N:M options where the target's profile lists the pattern for this layer kind (sparse tensor cores)."""
        out = []
        for pattern in SPARSE_PATTERNS:
            for e in dense:
                o = e.choice[layer]
                if not sparse_eligible(info[layer], geometry.get(layer)) or \
                        not profile.supports(info[layer].kind, f"sparse{pattern}+{o}"):
                    continue
                key = (layer, pattern)
                if key not in sparse_distortion:
                    from edgekit.structure import _sparsify, layer_inputs

                    x = layer_inputs(model, [layer], feeds)
                    sparse_distortion[key] = measured(_sparsify(model, {layer: f"sparse{pattern}"}, x))
                    struct["sparse"].setdefault(layer, {})[pattern] = sparse_distortion[key]
                size, ms = sparse_cost(info[layer], geometry.get(layer), o, e.bytes, e.latency_ms, profile, pattern)
                out.append(Entry({layer: f"sparse{pattern}+{o}"}, e.distortion + sparse_distortion[key], size, ms))
        return out

    track = progress(units, "measuring structural options", total=len(units)) if progress and structure else units
    rows: dict[str, dict[str, Entry]] = {}
    for unit in track:
        counts: dict[str, list[int]] = {}
        for g in unit.groups if "prune" in kinds else ():
            widths = sorted({channels.round_channels(math.ceil(f * g.channels), g.channels, multiple)
                             for f in KEEP_FRACTIONS} - {g.channels})
            order = np.argsort(-importance[g.name], kind="stable")
            for n in widths:
                fit_feeds, sources = refit_data or (feeds, None)
                edited, _ = refit.prune_and_refit(model, {g.name: np.sort(order[:n])}, fit_feeds, groups=[g],
                                                  sources=sources)
                d = measured(edited)
                struct["groups"].setdefault(g.name, {})[n] = d
            counts[g.name] = widths
        entries: list[Entry] = []
        for widths in _structures(unit, counts) if unit.groups else [{}]:
            d0 = sum(struct["groups"][g][n] for g, n in widths.items())
            ch = _channel_options(unit, widths)
            parts = [precision_entries(layer, *_io_channels(unit, widths, layer), ch[layer]) for layer in unit.layers]
            entries += _combine(parts, d0)
        if unit.removable is not None and "drop" in kinds:
            d = measured(graphedit.remove_units(model, [unit.removable.name]))
            struct["drops"][unit.name] = d
            entries.append(Entry(dict.fromkeys(unit.layers, "drop"), d, 0, 0.0))
        entries = pareto(entries)
        if len(unit.layers) == 1:
            rows[unit.name] = {next(iter(e.choice.values())): e for e in entries}
        else:
            rows[unit.name] = {"|".join(e.choice[layer] for layer in unit.layers): e for e in entries}
    params = {u.name: sum(info[layer].params for layer in u.layers) for u in units}
    return JointSpace(units, rows, params, metric, struct)


# -- allocation -------------------------------------------------------------------------------------------------------
JOINT_ROUNDS = 5  # solve → build → measure rounds while the measured latency or size misses the budget
OVERSHOOT = 0.85  # a plan measuring under 85 % of the latency budget after a miss: try a milder float-island charge


class JointAllocator:
    """The tables of one model on one target, made once (``mixed._tables``, the cost table, ``build_space``), and
    ``allocate(budget)``: the least-distortion plan that meets ``budget`` as *measured*. Each solved plan is built, its
    size read and its latency timed interleaved with FP32; while it misses, the solver's budget is tightened by the
    measured shortfall and the plan solved again. ``structure=False`` gives the bits-only space, solved the same way;
    with structure the bits-only rounds run first and ``selection.choose`` decides between the two. ``options``
    (layer -> allowed precision options) narrows the precisions (e.g. ``fp32`` only: pruning alone);
    ``measurements`` shares what was timed and scored with another allocator of the same model and data.

    ``probe`` (a Dataset, e.g. ``datafree.probe_samples``: inputs that match the training data's BatchNorm
    statistics) joins the held-out calibration samples wherever a *float* edit is measured: the structural rows of
    the tables, and the structural half of the plans that met the budget. Calibration data only shows what it
    contains; a channel that the calibration pictures never use looks free to prune. A quantized artifact is never
    run on the probe: its activation ranges were calibrated on the calibration data, and the probe's fall outside
    them (uniform INT8 EfficientNet-Lite0: relative MSE 0.44 on the probe against 0.01 on held-out crops), so there
    its error is clipping, whatever the plan's structure. Each plan is scored on the held-out samples as built, and
    on the probe as its edited float graph (a precision-only plan's is FP32 itself: zero)."""

    def __init__(self, *, profile, model, fp32, layers: list[LayerInfo], calib, work, cfg, ctx, structure=True,
                 recover_steps: int = 0, options: dict[str, list[str]] | None = None,
                 measurements: Measurements | None = None, probe=None, importance: str = "activations") -> None:
        import onnx

        from edgekit import mixed
        from edgekit.cost import layer_geometry
        from edgekit.data import concat
        from edgekit.structure import channel_stats, held_out, refit_feeds, sample_feeds

        self.profile, self.model, self.fp32, self.layers = profile, model, fp32, layers
        self.calib, self.work, self.cfg, self.ctx = calib, work, cfg, ctx
        self.t = mixed._tables(profile, model, fp32, layers, calib, work, cfg, ctx)
        allowed = self.t.options if options is None else {n: [o for o in opts if o in options.get(n, ["fp32"])]
                                                          for n, opts in self.t.options.items()}
        self.allowed = allowed
        self.hardware = HardwareTable.for_profile(profile)
        self.cost = cost_table(layers, profile, self.t.options, hardware=self.hardware,
                               geometry=layer_geometry(fp32.path),
                               bias_correction=cfg.bias_correction)
        graph = onnx.load(str(fp32.path))
        self.probe = probe
        measure_on = held_out(calib, mixed.SENSITIVITY_SAMPLES)[0]
        measure_on = measure_on if probe is None else concat(measure_on, probe)

        stats = channel_stats(fp32.path, importance)

        def space(structure) -> JointSpace:
            return build_space(graph, layers, profile, allowed, self.t.sens, self.cost, self.hardware,
                               measure_on, sample_feeds(calib),
                               structure=structure, bias_correction=cfg.bias_correction, progress=ctx.track,
                               quantizer=self.t.quantizer, refit_data=refit_feeds(calib),
                               channel_stats=stats)

        self.space = space(structure)
        self.structure = bool(structure_kinds(structure))
        # the bits-only space, solved first in every allocation: exactly what ``structure=False`` solves (the joint
        # rows leave out precision options a structural one dominates, so they are not it)
        self.bits_space = space(False) if self.structure else self.space
        # plans are compared on calibration samples the refit of pruned layers did not see
        self._held_out, self.held_out = held_out(calib)
        self._reference = None  # FP32 outputs on those samples (and on the probe), for measured distortions
        self._probe_reference = None
        # what was timed and scored, by plan options (shared with another allocator of the same model and data)
        self.measured = measurements if measurements is not None else Measurements()
        self.settings = mixed._settings(self.t)
        if recover_steps:
            self.settings.setdefault("structure", {})["recover_steps"] = int(recover_steps)
        if importance != "activations":
            self.settings.setdefault("structure", {})["importance"] = importance

    def allocate(self, budget: Budget, solver: str = "auto", tag: str = "") -> tuple[Plan, dict]:
        from edgekit import mixed
        from edgekit.agent.runtime import OrtRuntime, compare_latency
        from edgekit.errors import ConfigError
        from edgekit.solvers import solve

        t = self.t
        solve_budget, notes = mixed._solver_budget(budget, self.cost, t.uniform, t.uniform_artifact, self.fp32,
                                                   self.calib)
        target = notes["latency_ms"] / notes["fp32_ms"] if notes.get("latency_ms") else None
        size_limit = budget.size_bytes
        feeds = {k: v[:1] for k, v in self.calib.inputs.items()}
        fp32_rt = OrtRuntime(self.fp32.path)
        chain = {n for n, row in self.cost.entries.items() if any(o != "fp32" for o in row)}
        table_fp32 = sum(row["fp32"].latency_ms for row in self.cost.entries.values())
        tried: list[dict] = []
        infeasible: ConfigError | None = None  # the bits-only space's, when the joint space may still reach the budget
        uniform_allowed = all(c.option in self.allowed.get(c.layer, ()) for c in t.uniform.layers)

        seen: dict[tuple, float] = {}  # one ratio per plan within this allocation

        def measure(plan: Plan, path) -> float:  # timed once per allocation, pooled with other allocations' timings
            key = plan_key(plan)
            if key not in seen:
                if self.measured.wants_ratio(key):
                    stats = compare_latency({"fp32": fp32_rt, "plan": OrtRuntime(path)}, feeds, rounds=10,
                                            per_round=10)
                    self.measured.add_ratio(key, stats["plan"].median_ms / stats["fp32"].median_ms)
                seen[key] = self.measured.ratio(key)
            return seen[key]

        if target is not None and uniform_allowed:  # uniform INT8 is a candidate, measured in the same way
            ratio = measure(t.uniform, t.uniform_artifact.path)
            tried.append({"plan": replace(t.uniform, activations=self.settings), "artifact": t.uniform_artifact,
                          "ratio": ratio, "distortion": sum(self.t.sens.values[c.layer].get(c.option, 0.0)
                                                            for c in t.uniform.layers),
                          "met": ratio <= target * mixed.LATENCY_SLACK and (size_limit is None or
                                                                            t.uniform_artifact.size <= size_limit),
                          "uniform": True})
            log.info("uniform INT8 measures %.3fx FP32 (target %.3fx)", ratio, target)
        # the bits-only space first, then the joint space; ``selection.choose`` keeps a joint plan only where nothing
        # simpler met the budget or it is measurably better
        spaces = [("bits", self.bits_space)] + ([("joint", self.space)] if self.structure else [])
        for kind, base in spaces:
            space, b, penalty = base, solve_budget, 0.0
            missed_penalty: float | None = None  # the largest float-island charge whose plan missed the budget
            met_penalty: float | None = None  # the smallest one whose plan met it
            for k in range(JOINT_ROUNDS):
                try:
                    sol = solve(space.problem(b), solver)
                except ConfigError as exc:
                    if any(not x.get("uniform") for x in tried):
                        break
                    if target is None or b.size_bytes is not None or b.avg_bits is not None:
                        if kind == "bits" and self.structure:  # out of the bits-only space's reach: the joint next
                            infeasible = exc
                            break
                        raise
                    log.warning("%s by the tables; measuring the fastest plan instead", exc.message)
                    sol = space.fastest()
                plan = base.plan(sol, self.layers, target=self.profile.name, model_sha256=self.model.sha256,
                                 activations=self.settings, budget=budget)
                prev = next((x for x in tried if plan_key(x["plan"]) == plan_key(plan)), None)
                if prev is not None and prev.get("space", "bits") == kind:
                    break  # this space's solver gives a plan it already gave: no progress
                # rounds are timed without the recovery fine-tune (it changes weights, not speed); the kept plan
                # gets it. The other structural settings (how channels are ranked) stay: they decide the graph.
                quick = replace(plan, activations=without_recovery(plan.activations))
                art = prev["artifact"] if prev is not None else mixed.apply_plan(
                    quick, self.fp32, self.calib, self.work / f"{kind}{tag}{k}" / "model.onnx", self.cfg, self.ctx,
                    None if plan.is_structural else t.quantizer)
                ratio = None
                if target is not None:
                    ratio = measure(plan, art.path)
                over_t = ratio is not None and ratio > target * mixed.LATENCY_SLACK
                over_s = size_limit is not None and art.size > size_limit
                unpenalized = base.rows
                distortion = sum(unpenalized[u][o].distortion for u, o in sol.choice.items())
                tried.append({"plan": plan, "artifact": art, "ratio": ratio, "distortion": distortion,
                              "met": not (over_t or over_s), "penalty_ms": round(penalty, 5),
                              "space": kind})
                log.info("%s round %d: predicted distortion %.4g, %d B%s", kind, k, distortion, art.size,
                         "" if ratio is None else f", measured {ratio:.3f}x FP32 (target {target:.3f}x)")
                overshot = ratio is not None and ratio < target * OVERSHOOT
                if not (over_t or over_s) and not (overshot and missed_penalty is not None):
                    break
                if over_s:  # the next plan must shed at least the measured excess, however small
                    b = replace(b, size_bytes=min(int(b.size_bytes * size_limit / art.size),
                                                  sol.bytes - (art.size - size_limit) - 1))
                if over_t:
                    islands = [c.layer for c in plan.layers if c.layer in chain and c.option.split("+")[0] == "fp32"]
                    predicted = sum(unpenalized[u][o].latency_ms for u, o in sol.choice.items())
                    if islands:  # charge the float layers in the integer chain with the measured shortfall
                        missed_penalty = penalty
                        penalty = penalty + max(0.0, (ratio * table_fp32 - predicted) / len(islands))
                        if met_penalty is not None:  # bracketed: do not jump past a charge that met the budget
                            penalty = min(penalty, (penalty + met_penalty) / 2)
                        space = base.with_float_penalty(penalty, chain)
                    else:
                        b = replace(b, latency_ms=b.latency_ms * target / ratio)
                elif overshot:  # met with room to spare after a miss: try halfway between the two charges
                    met_penalty = penalty
                    penalty = (missed_penalty + penalty) / 2
                    space = base.with_float_penalty(penalty, chain)
        if not tried and infeasible is not None:
            raise infeasible
        meeting = [x for x in tried if x["met"]]
        self._measure_distortion(meeting)
        best, why = self._keep(tried, target)
        if not best["met"]:
            log.warning("%s one found is kept", why)
        bits = [x for x in tried if x.get("space", "bits") == "bits"]
        bits_only = None  # what the bits-only space alone keeps (the same tables, rounds and measurements)
        if bits:
            b_best, b_why = self._keep(bits, target)
            bits_only = {"plan": replace(b_best["plan"], budget={**b_best["plan"].budget,
                                                                 **{k: v for k, v in notes.items() if v}}),
                         "artifact": b_best["artifact"], "met": b_best["met"], "kept_because": b_why}
        rounds = [{"round": "uniform int8" if x.get("uniform") else i,
                   "predicted_distortion": round(x["distortion"], 6), "bytes": x["artifact"].size,
                   "measured_ratio": None if x["ratio"] is None else round(x["ratio"], 4), "met": x["met"],
                   "space": x.get("space", "bits"), "measured_distortion": x.get("measured"),
                   "float_island_penalty_ms": x.get("penalty_ms")} for i, x in enumerate(tried)]
        if best["plan"].is_structural and best["plan"].activations.get("structure", {}).get("recover_steps"):
            best["artifact"] = mixed.apply_plan(best["plan"], self.fp32, self.calib,
                                                self.work / f"joint{tag}-recovered" / "model.onnx", self.cfg, self.ctx)
        analysis = {"sensitivity": t.sens.to_dict(), "cost": self.cost.to_dict(), "family": t.family,
                    "hardware_table": self.profile.hardware_table if self.hardware else None, **notes,
                    "latency_rounds": rounds, "applied": (best["plan"].layers, best["artifact"]), "kept_because": why,
                    "bits_only": bits_only,
                    "joint": {"space": "joint" if self.structure else "bits", "structure": self.space.structure,
                              "units": {u.name: list(u.layers) for u in self.space.units if len(u.layers) > 1},
                              "selection_samples": {"count": len(self._held_out) + (0 if self.probe is None
                                                                                    else len(self.probe)),
                                                    "held_out": self.held_out,
                                                    "probe": 0 if self.probe is None else len(self.probe)},
                              "options": sum(len(r) for r in self.space.rows.values())}}
        plan = replace(best["plan"], budget={**best["plan"].budget, **{k: v for k, v in notes.items() if v}})
        return plan, analysis


    @staticmethod
    def _keep(tried: list[dict], target: float | None) -> tuple[dict, str]:
        """``selection.choose`` among the plans that met the budget; without one, the fastest (latency budgets) or
        the smallest plan tried."""
        meeting = [x for x in tried if x["met"]]
        if meeting:
            return choose(meeting)
        why = "no plan met the budget as measured: the " + ("fastest" if target is not None else "smallest")
        return min(tried, key=lambda x: (x["ratio"] or 0.0, x["artifact"].size)), why

    def _measure_distortion(self, candidates: list[dict]) -> None:
        """Each candidate's per-sample distortions: on held-out calibration samples, the whole artifact (not the
        tables' sum), so structural and precision plans are compared on what they do, not on the additive prediction,
        and not on the samples the pruned layers were refit to; then, with a probe, the plan's edited float graph on
        the probe samples (see the class docstring)."""
        import onnx

        from edgekit.analyze import _run

        metric = self.t.sens.metric
        if self._reference is None:
            fp32 = onnx.load(str(self.fp32.path))
            self._reference = _run(fp32, self._held_out)
            if self.probe is not None:
                self._probe_reference = _run(fp32, self.probe)
        for x in candidates:
            key = plan_key(x["plan"])
            if key not in self.measured.samples:
                out = _run(onnx.load(str(x["artifact"].path)), self._held_out)
                samples = sample_distortions(self._reference, out, metric)
                if self.probe is not None:
                    samples = np.concatenate([samples, self._probe_distortions(x["plan"], x["artifact"])])
                self.measured.samples[key] = samples
            x["samples"] = self.measured.samples[key]
            x["measured"] = round(float(np.mean(x["samples"])), 6)
            x["simple"] = x.get("space", "bits") == "bits" and not x["plan"].is_structural

    def _probe_distortions(self, plan: Plan, artifact) -> np.ndarray:
        """Per probe sample, the distortion of ``plan``'s edited float graph (``mixed.structure_model_path``; the
        artifact itself when ``apply_plan`` quantized no layer); zeros for a precision-only plan, whose float graph is
        FP32."""
        import onnx

        from edgekit.analyze import _run
        from edgekit.mixed import structure_model_path

        if not plan.is_structural:
            return np.zeros(len(self.probe))
        path = structure_model_path(artifact.path)
        out = _run(onnx.load(str(path if path.is_file() else artifact.path)), self.probe)
        return sample_distortions(self._probe_reference, out, self.t.sens.metric)


def without_recovery(activations: dict) -> dict:
    """A plan's settings without the recovery fine-tune (``structure.recover_steps``), everything else kept."""
    structure = {k: v for k, v in activations.get("structure", {}).items() if k != "recover_steps"}
    out = {k: v for k, v in activations.items() if k != "structure"}
    return {**out, "structure": structure} if structure else out


def allocate_joint(*, budget: Budget, solver: str, profile, model, fp32, layers: list[LayerInfo], calib, work, cfg,
                   ctx, structure: bool = True, recover_steps: int = 0,
                   importance: str = "activations") -> tuple[Plan, dict]:
    """``JointAllocator(...).allocate(budget, solver)``: what ``edgekit build --space joint`` runs. A PyTorch model
    with BatchNorm gets ``datafree.probe_samples`` as the allocator's probe."""
    probe = None
    if structure and getattr(model, "module", None) is not None:
        from edgekit.datafree import probe_samples

        probe = probe_samples(model.module, model.inputs, seed=ctx.seed, track=ctx.track, cache=ctx.cache("probe"),
                              model_sha256=model.sha256)
    return JointAllocator(profile=profile, model=model, fp32=fp32, layers=layers, calib=calib, work=work, cfg=cfg,
                          ctx=ctx, structure=structure, recover_steps=recover_steps, probe=probe,
                          importance=importance).allocate(budget, solver)
