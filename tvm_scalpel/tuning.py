"""Group-width autotuning: measure candidate group widths and schedule knobs per layer shape.

For a dense layer ``[N, K]`` at a pruning rate and batch size, each candidate is a group width
g and a set of kernel knobs. A weight of that shape is pruned with g, the grouped-sparse kernel
is built with the knobs and timed on the target. As TVM's own tuners do, an XGBoost model
trained on the measurements so far ranks the rest, and only the most promising are measured
until the trial budget is spent.

Every measurement is appended to a JSON-lines database at once, so an interrupted run loses
nothing and a second run measures nothing it already knows. Records are keyed by the target
(its JSON), so one file serves several targets; a line that does not parse is skipped with a
warning, never deleted.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ScalpelError
from .pruning import prune_groups
from .targets import TargetProfile

log = logging.getLogger("tvm_scalpel.tuning")

# Vectors a group may span, besides the fractions of one: a group of 2 or 4 vectors loads its
# weights and inputs in longer runs per column index (on a Zen 3 AVX2 host, AlexNet fc6 at rate
# 0.9 ran 1.27 ms at g=16 against 1.60 ms at g=8 = one vector), so every target searches them.
VECTORS_PER_GROUP = (2, 4)


def group_widths(simd_width: int, k: int) -> list[int]:
    """Candidate group widths: the powers of two up to ``max(VECTORS_PER_GROUP)`` vectors (1, 2,
    ..., SIMD width, 2x and 4x it), none wider than the layer's ``k`` inputs."""
    widest = max(VECTORS_PER_GROUP) * max(simd_width, 1)
    return [1 << e for e in range(widest.bit_length()) if (1 << e) <= min(widest, k)]


@dataclass(frozen=True)
class Task:
    """What is tuned: one layer shape at one pruning rate and batch size."""

    n: int
    k: int
    rate: float
    batch: int = 1

    def key(self, profile: TargetProfile) -> str:
        return json.dumps([str(profile.target), self.n, self.k, round(self.rate, 3), self.batch])


@dataclass(frozen=True)
class Candidate:
    group_width: int
    unroll: int
    batch_tile: int
    parallel: bool

    def knobs(self):
        """The kernel knobs this candidate stands for."""
        from .schedules import CpuKnobs

        return CpuKnobs(unroll=self.unroll, batch_tile=self.batch_tile,
                        parallel_gemv=self.parallel, parallel_gemm=self.parallel)

    def features(self, task: Task) -> list[float]:
        density = 1.0 - task.rate
        return [math.log2(self.group_width), self.unroll, self.batch_tile, float(self.parallel),
                math.log2(task.n), math.log2(task.k), density, math.log2(task.batch)]


@dataclass
class Measurement:
    task: Task
    candidate: Candidate
    seconds: float


# A microcontroller (low parallelism) has no fp32 SIMD: what a wider group saves there is the
# column index loaded and the address computed once per group instead of once per weight.
MCU_GROUP_WIDTHS = (1, 2, 4, 8, 16)


def candidates(task: Task, profile: TargetProfile) -> list[Candidate]:
    if profile.parallelism == "low":  # one core, no threads, batch 1: the group width only
        return [Candidate(g, 1, 1, False) for g in MCU_GROUP_WIDTHS if g <= task.k]
    widths = group_widths(profile.simd_width, task.k)
    tiles = (4, 8) if task.batch > 1 else (8,)  # the batch tile only matters beyond batch 1
    return [Candidate(g, u, t, p) for g, u, t, p in
            itertools.product(widths, (1, 2, 4), tiles, (False, True))]


COST_UNITS = ("seconds", "instructions")  # time on a CPU; an instruction count under qemu (MCU)


class TuningDatabase:
    """Append-only JSON lines: one measurement a line. A record's cost is ``seconds`` or, for a
    microcontroller measured under qemu, ``instructions``; records are keyed by the target, so
    the costs compared with each other are always of one unit."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: dict[str, list[dict]] = {}
        self.dense: dict[str, dict[str, float]] = {}  # dense-layer key -> {kernel: seconds}
        self.conv: dict[str, list[tuple[dict, float]]] = {}  # conv-shape key -> [(knobs, seconds)]
        if self.path.is_dir():
            raise ScalpelError(f"{self.path}: is a directory, not a tuning database")
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        bad = 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    key, secs = rec["key"], float(rec["seconds"] if "seconds" in rec else rec["instructions"])
                    if "dense" in rec:  # a dense layer's kernel: ours or meta_schedule's
                        self.dense.setdefault(key, {})[str(rec["dense"])] = secs
                        continue
                    if "conv" in rec:  # the blocked conv kernel's knobs (conv_tuning.py)
                        from .conv_tuning import knobs_from

                        knobs_from(rec["conv"])
                        self.conv.setdefault(key, []).append((dict(rec["conv"]), secs))
                        continue
                    cand = rec["candidate"]
                    Candidate(**cand)
                except (ValueError, KeyError, TypeError):
                    bad += line.strip() != ""
                    continue
                self.records.setdefault(key, []).append({"candidate": cand, "seconds": secs})
        if bad:
            log.warning("%s: skipped %d unreadable line(s); they are kept in the file", self.path, bad)

    def lookup(self, task: Task, profile: TargetProfile) -> dict[Candidate, float]:
        return {Candidate(**r["candidate"]): r["seconds"] for r in self.records.get(task.key(profile), [])}

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, task: Task, profile: TargetProfile, candidate: Candidate, seconds: float,
            unit: str = "seconds") -> None:
        rec = {"key": task.key(profile), "candidate": asdict(candidate), unit: seconds}
        self._append(rec)
        self.records.setdefault(rec["key"], []).append({"candidate": rec["candidate"], "seconds": seconds})

    @staticmethod
    def dense_key(profile: TargetProfile, n: int, k: int, batch: int) -> str:
        return json.dumps([str(profile.target), n, k, "dense", batch])

    def add_conv(self, profile: TargetProfile, shape, knobs, seconds: float) -> None:
        """Record the blocked conv kernel's time for ``shape`` built with ``knobs``."""
        from .conv_tuning import record

        rec = record(profile, shape, knobs, seconds)
        self._append(rec)
        self.conv.setdefault(rec["key"], []).append((rec["conv"], seconds))

    def conv_times(self, profile: TargetProfile, shape) -> dict:
        """``{ConvKnobs: seconds}`` measured for ``shape`` on this target (the fastest of repeats)."""
        from .conv_tuning import conv_key, knobs_from

        times: dict = {}
        for knobs, seconds in self.conv.get(conv_key(profile, shape), []):
            k = knobs_from(knobs)
            times[k] = min(seconds, times.get(k, float("inf")))
        return times

    def conv_knobs_for(self, profile: TargetProfile, shape):
        """The fastest recorded conv knobs for ``shape``, or None (the rule then applies)."""
        times = self.conv_times(profile, shape)
        return min(times, key=times.get) if times else None

    def add_dense(self, profile: TargetProfile, n: int, k: int, batch: int, kernel: str,
                  seconds: float, unit: str = "seconds") -> None:
        """Record a dense layer's cost on one kernel: "ours" or "meta_schedule"."""
        key = self.dense_key(profile, n, k, batch)
        self._append({"key": key, "dense": kernel, unit: seconds})
        self.dense.setdefault(key, {})[kernel] = seconds

    def dense_times(self, profile: TargetProfile, n: int, k: int, batch: int) -> dict[str, float]:
        return dict(self.dense.get(self.dense_key(profile, n, k, batch), {}))

    def meta_schedule_wins(self, profile: TargetProfile, n: int, k: int, batch: int) -> bool:
        times = self.dense_times(profile, n, k, batch)
        return "meta_schedule" in times and times["meta_schedule"] < times.get("ours", float("inf"))

    def knobs_for(self, profile: TargetProfile, n: int, k: int, group_width: int, rate: float,
                  batch: int = 1, tolerance: float = 0.02):
        """The fastest measured kernel knobs for a ``[n, k]`` layer pruned with ``group_width``
        at about ``rate`` (the rate a compiled model's zeros show is not exactly the asked one),
        as ``CpuKnobs``; None if the database has no such record."""
        best = None
        for key, records in self.records.items():
            target, kn, kk, krate, kbatch = json.loads(key)
            if (target, kn, kk, kbatch) != (str(profile.target), n, k, batch) or abs(krate - rate) > tolerance:
                continue
            for r in records:
                cand = Candidate(**r["candidate"])
                if cand.group_width == group_width and (best is None or r["seconds"] < best[1]):
                    best = (cand, r["seconds"])
        return None if best is None else best[0].knobs()

    def best(self, task: Task, profile: TargetProfile) -> tuple[Candidate, float] | None:
        known = self.lookup(task, profile)
        if not known:
            return None
        cand = min(known, key=known.get)
        return cand, known[cand]


def measure(task: Task, candidate: Candidate, profile: TargetProfile, seed: int = 0,
            min_repeat_ms: int = 20, rpc: str | None = None) -> float:
    """Seconds per call of the grouped-sparse kernel for ``task`` built as ``candidate``."""
    from .format import GroupedSparseMatrix

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((task.n, task.k)).astype(np.float32)
    m = GroupedSparseMatrix.from_dense(prune_groups(w, candidate.group_width, task.rate).weight,
                                       candidate.group_width)
    return time_layer(profile, m, task.batch, candidate.knobs(), seed, min_repeat_ms, rpc)


def time_kernel(profile: TargetProfile, func, arrays: list[np.ndarray], min_repeat_ms: int = 20,
                rpc: str | None = None) -> float:
    """Seconds per call of the PrimFunc ``func`` on ``arrays`` (median of 5 runs of at least
    ``min_repeat_ms``), here or on the RPC server ``rpc``."""
    import tvm

    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=profile.target)
    if rpc is not None:
        from .schedules.toolchains import cross_linker
        from .remote import time_remote

        return time_remote(rpc, exe, arrays, cross_linker(profile), min_repeat_ms)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    timer = exe.mod.time_evaluator("main", dev, number=10, repeat=5, min_repeat_ms=min_repeat_ms)
    return float(np.median(timer(*args).results))


def time_layer(profile: TargetProfile, weight, batch: int = 1, knobs=None, seed: int = 0,
               min_repeat_ms: int = 20, rpc: str | None = None, positions: int | None = None) -> float:
    """Seconds per call of our kernel for one layer, here or on the RPC server ``rpc``: the
    grouped-sparse kernel for a ``GroupedSparseMatrix``, the dense kernel for ``W[N, K]``;
    with ``positions``, the conv layers' patch kernel over that many output positions."""
    from . import schedules
    from .format import GroupedSparseMatrix

    if isinstance(weight, GroupedSparseMatrix):
        (n, k), packed = weight.shape, schedules.pack_grouped_sparse(weight)
        spec = schedules.layer_spec(profile, n, k, True, weight.group_width, weight.n_groups, knobs)
        operands = [packed.values, packed.offsets, packed.indptr]
    else:
        n, k = weight.shape
        spec = schedules.layer_spec(profile, n, k, True, knobs=knobs)
        operands = [np.ascontiguousarray(weight, dtype=np.float32)]
    if positions is None:
        func, x_shape, y_shape = schedules.kernel(profile, [spec]), (batch, k), (batch, n)
    else:
        func = schedules.patch_kernel(profile, spec, positions)
        x_shape, y_shape = (batch, k, positions), (batch, n, positions)
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    arrays = [x, *operands, np.zeros(n, np.float32), np.zeros(y_shape, np.float32)]
    return time_kernel(profile, func, arrays, min_repeat_ms, rpc)


def _rank(measured: dict[Candidate, float], todo: list[Candidate], task: Task, seed: int) -> list[Candidate]:
    """``todo`` best-first by an XGBoost model of log-time fitted on ``measured``."""
    if len(measured) < 4:
        return todo
    import xgboost as xgb

    model = xgb.XGBRegressor(n_estimators=60, max_depth=4, learning_rate=0.2, random_state=seed,
                             n_jobs=1, verbosity=0)
    model.fit(np.array([c.features(task) for c in measured]),
              np.log(np.array(list(measured.values()))))
    pred = model.predict(np.array([c.features(task) for c in todo]))
    return [todo[i] for i in np.argsort(pred, kind="stable")]


def tune_task(task: Task, profile: TargetProfile, db: TuningDatabase, trials: int,
              seed: int = 0, measure_fn=measure, progress=None,
              unit: str = "seconds") -> tuple[Candidate, float, int]:
    """Measure candidates until ``trials`` of them are known (database records count), so a
    second run with the same budget measures nothing. Returns ``(best, seconds, new ones)``.

    The first round measures one candidate per group width (so no width goes unseen), later
    rounds take the XGBoost model's best-ranked untried candidates.
    """
    space = candidates(task, profile)
    measured = {c: s for c, s in db.lookup(task, profile).items() if c in space}
    new = 0
    first = [c for c in space if c.unroll == 2 and c.batch_tile == 8 and not c.parallel]
    while len(measured) < trials:
        todo = [c for c in space if c not in measured]
        if not todo:
            break
        seen_widths = {c.group_width for c in measured}
        pending = [c for c in first if c.group_width not in seen_widths and c in todo]
        batch = pending or _rank(measured, todo, task, seed)[:4]
        for cand in batch[: trials - len(measured)]:
            secs = measure_fn(task, cand, profile)
            db.add(task, profile, cand, secs, unit)
            measured[cand] = secs
            new += 1
            if progress is not None:
                progress.update(1)
    if not measured:
        raise ScalpelError(f"no candidate could be measured for layer {task.n}x{task.k}")
    best = min(measured, key=measured.get)
    return best, measured[best], new
