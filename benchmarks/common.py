"""Shared helpers of the benchmark scripts: timing, accuracy checks, onnxruntime sessions,
machine description, markdown tables and plots.

Import ``tvm_scalpel`` before anything touches TVM: it sets ``TVM_NUM_THREADS`` to every core
before TVM's thread pool starts (otherwise TVM runs single-threaded on this kind of machine).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import tvm_scalpel  # noqa: F401  (sets TVM_NUM_THREADS first)

import numpy as np
import onnx
import tvm

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"  # one folder per machine class below it: see results_dir

# Outputs must match the float64 reference to this relative max error (max|a-b| / max|ref|).
REL_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # The passes log one line per layer at INFO: too chatty inside a benchmark loop.
    logging.getLogger("tvm_scalpel").setLevel(logging.DEBUG if verbose else logging.WARNING)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Per-call times (seconds), one sample per repeat; each repeat averages ``number`` calls.

    ``foreign_load``: CPU (in cores) that *other* processes used while this was measured; see
    :class:`CpuMonitor`. Above :data:`FOREIGN_LOAD_LIMIT` the timing is suspect.
    """

    samples: tuple[float, ...]
    number: int
    foreign_load: float = 0.0

    @property
    def disturbed(self) -> bool:
        return self.foreign_load > FOREIGN_LOAD_LIMIT

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples) * 1e6

    @property
    def min_us(self) -> float:
        return min(self.samples) * 1e6

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: a rough noise figure."""
        med = statistics.median(self.samples)
        return (max(self.samples) - min(self.samples)) / med if med > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.median_us:.1f} us (min {self.min_us:.1f}, {len(self.samples)}x{self.number})"


# --------------------------------------------------------------------------------------------
# Noise control: other processes on a small machine
# --------------------------------------------------------------------------------------------

# A measurement during which other processes used more than this many cores is retried.
FOREIGN_LOAD_LIMIT = 0.15


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs; steal time counts as busy (another VM ran)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _self_jiffies() -> int:
    """utime + stime of this process, all threads (TVM's pool, onnxruntime's, OpenBLAS's)."""
    with open("/proc/self/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


class CpuMonitor:
    """Measures how many cores other processes kept busy during a ``with`` block."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.foreign_load = 0.0

    def __enter__(self) -> "CpuMonitor":
        try:
            self._busy, self._total = _cpu_jiffies()
            self._self = _self_jiffies()
        except OSError:  # not Linux: no monitoring
            self._total = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._total is None:
            return
        busy, total = _cpu_jiffies()
        wall = (total - self._total) / self.ncpu
        if wall > 0:
            foreign = (busy - self._busy) - (_self_jiffies() - self._self)
            self.foreign_load = max(0.0, foreign / wall)


def foreign_load_now(seconds: float = 0.3) -> float:
    with CpuMonitor() as mon:
        time.sleep(seconds)
    return mon.foreign_load


def wait_for_quiet(timeout_s: float) -> float:
    """Wait (up to ``timeout_s``) until other processes leave the CPUs alone; the last load seen."""
    deadline = time.monotonic() + timeout_s
    load = foreign_load_now()
    while load > FOREIGN_LOAD_LIMIT and time.monotonic() < deadline:
        load = foreign_load_now(0.5)
    return load


@dataclass
class NoisePolicy:
    """How hard to try for undisturbed measurements.

    Interleaved measurements (:func:`measure_rounds`) run up to ``extra_rounds`` more rounds
    than asked to replace rounds that other processes disturbed; single measurements
    (:func:`measure_quietly`) are retried ``retries`` times. Before a new attempt we wait up to
    ``wait_s`` for quiet, with at most ``budget_s`` of waiting in the whole run.
    """

    retries: int = 2
    extra_rounds: int = 5
    wait_s: float = 10.0
    budget_s: float = 180.0
    waited_s: float = 0.0
    rounds: int = 0
    disturbed_rounds: int = 0
    measured: int = 0
    retried: int = 0
    flagged: list[str] = field(default_factory=list)

    def wait(self) -> None:
        wait = min(self.wait_s, self.budget_s - self.waited_s)
        if wait > 0:
            t0 = time.monotonic()
            wait_for_quiet(wait)
            self.waited_s += time.monotonic() - t0

    def summary(self) -> str:
        text = (f"{self.rounds} measurement rounds, {self.disturbed_rounds} of them disturbed by "
                f"other processes (> {FOREIGN_LOAD_LIMIT:g} cores) and replaced or dropped; "
                f"{self.measured} single measurements, {self.retried} retried; "
                f"{self.waited_s:.0f} s spent waiting for quiet")
        if self.flagged:
            text += (f"; {len(self.flagged)} results still disturbed, marked with *: "
                     + ", ".join(self.flagged))
        else:
            text += "; no result left disturbed"
        return text


NOISE = NoisePolicy()


def measure_quietly(measure: Callable[[], "Timing"], what: str, retries: int | None = None) -> "Timing":
    """Run ``measure`` and retry it (after waiting for quiet) while other processes disturbed it,
    under :data:`NOISE`'s policy. Returns the least disturbed attempt, ``foreign_load`` set.
    For the few measurements too slow for :func:`measure_rounds`."""
    best: Timing | None = None
    NOISE.measured += 1
    retries = NOISE.retries if retries is None else retries
    for attempt in range(retries + 1):
        with CpuMonitor() as mon:
            timing = measure()
        timing = Timing(timing.samples, timing.number, mon.foreign_load)
        if best is None or timing.foreign_load < best.foreign_load:
            best = timing
        if not timing.disturbed or attempt == retries:
            break
        if attempt == 0:
            NOISE.retried += 1
        log.info("%s: other processes used %.2f cores during the measurement; measuring again",
                 what, timing.foreign_load)
        NOISE.wait()
    assert best is not None
    if best.disturbed:
        NOISE.flagged.append(what)
        log.warning("%s: disturbed by other processes (%.2f cores) in every attempt: kept, flagged",
                    what, best.foreign_load)
    return best


@dataclass(frozen=True)
class TimingConfig:
    repeat: int = 7  # samples (rounds); the median is reported
    min_repeat_ms: float = 40.0  # each sample runs the call often enough to last this long


# --------------------------------------------------------------------------------------------
# Samplers and interleaved rounds
# --------------------------------------------------------------------------------------------

# Thread pools (OpenBLAS's, onnxruntime's, TVM's) spin for a while after a call. Before a
# sample of another runtime we pause this long so that the last one's spinning threads do not
# steal the cores.
COOLDOWN_S = 0.2


class Sampler:
    """One contender: ``calibrate`` once, then each ``sample`` returns seconds per call over a
    run of ``number`` calls lasting about ``min_repeat_ms`` (after one warm-up call)."""

    family = "python"
    number = 1

    def calibrate(self, min_repeat_ms: float) -> None:
        raise NotImplementedError

    def sample(self) -> float:
        raise NotImplementedError


class PythonSampler(Sampler):
    """A Python callable, timed in a Python loop."""

    def __init__(self, fn: Callable[[], Any], family: str = "python", max_number: int = 1_000_000):
        self.fn = fn
        self.family = family
        self.max_number = max_number

    def _run(self, number: int) -> float:
        fn = self.fn
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return time.perf_counter() - t0

    def calibrate(self, min_repeat_ms: float) -> None:
        self.fn()
        target = min_repeat_ms / 1e3
        number = 1
        while True:
            dt = self._run(number)
            if dt >= target or number >= self.max_number:
                break
            number = min(self.max_number, max(number * 2, int(number * target / max(dt, 1e-7) * 1.2)))
        self.number = number

    def sample(self) -> float:
        self.fn()
        return self._run(self.number) / self.number


class TvmSampler(Sampler):
    """A compiled TVM function timed by TVM's C++ time evaluator (no Python in the loop; the
    evaluator makes one warm-up call itself). ``prepare`` runs before each sample (the Relax
    VM's ``set_input``)."""

    family = "tvm"

    def __init__(self, mod: Any, name: str, args: Sequence[Any], prepare: Callable[[], None] | None = None):
        self.mod, self.name, self.args, self.prepare = mod, name, list(args), prepare
        self.evaluator = None

    def _evaluator(self, number: int):
        return self.mod.time_evaluator(self.name, tvm.cpu(), number=number, repeat=1)

    def calibrate(self, min_repeat_ms: float) -> None:
        if self.prepare:
            self.prepare()
        one = float(self._evaluator(1)(*self.args).results[0])
        self.number = max(1, int(np.ceil(min_repeat_ms / 1e3 / max(one, 1e-8))))
        if self.number > 1:  # the first estimate is a single cold call: refine once
            per_call = float(self._evaluator(self.number)(*self.args).mean)
            self.number = max(1, int(np.ceil(min_repeat_ms / 1e3 / max(per_call, 1e-8))))
        self.evaluator = self._evaluator(self.number)

    def sample(self) -> float:
        if self.prepare:
            self.prepare()
        return float(self.evaluator(*self.args).results[0])


def vm_sampler(vm: tvm.relax.VirtualMachine, x: tvm.runtime.Tensor, func: str = "main") -> TvmSampler:
    """A Relax VM function by ``invoke_stateful`` in TVM's C++ evaluator: no Python."""
    return TvmSampler(vm.module, "invoke_stateful", [func], prepare=lambda: vm.set_input(func, x))


def measure_rounds(samplers: dict[Any, Sampler], cfg: TimingConfig, what: str,
                   seed: int = 0, progress: Callable[[], None] | None = None) -> dict[Any, Timing]:
    """Time every sampler in ``cfg.repeat`` interleaved rounds; per sampler, the median over rounds.

    One round takes one sample of every contender, grouped by runtime family (a pause of
    :data:`COOLDOWN_S` between families: thread pools spin after work), in a random order
    within a family. A burst of work from another process
    thus hits one round of every contender instead of all samples of one. A round during which
    other processes used more than :data:`FOREIGN_LOAD_LIMIT` cores is replaced by another one
    (at most ``NOISE.extra_rounds``); if too few clean rounds remain, all rounds are used and the
    results are flagged.
    """
    rng = np.random.default_rng(seed)
    families: dict[str, list[Any]] = {}
    for key, s in samplers.items():
        families.setdefault(s.family, []).append(key)
    for key, s in samplers.items():
        s.calibrate(cfg.min_repeat_ms)
    clean: list[dict[Any, float]] = []
    rounds: list[tuple[dict[Any, float], float]] = []
    while len(clean) < cfg.repeat and len(rounds) < cfg.repeat + NOISE.extra_rounds:
        samples: dict[Any, float] = {}
        with CpuMonitor() as mon:
            for fam, keys in families.items():
                time.sleep(COOLDOWN_S)
                for i in rng.permutation(len(keys)):
                    samples[keys[i]] = samplers[keys[i]].sample()
        NOISE.rounds += 1
        rounds.append((samples, mon.foreign_load))
        if mon.foreign_load <= FOREIGN_LOAD_LIMIT:
            clean.append(samples)
        else:
            NOISE.disturbed_rounds += 1
            log.info("%s: round %d disturbed (other processes used %.2f cores): one more round",
                     what, len(rounds), mon.foreign_load)
            NOISE.wait()
        if progress:
            progress()
    enough = len(clean) >= max(1, (cfg.repeat + 1) // 2)
    use = clean if enough else [r for r, _ in rounds]
    load = 0.0 if enough else statistics.median(l for _, l in rounds)
    if not enough:
        NOISE.flagged.append(what)
        log.warning("%s: only %d of %d rounds undisturbed: all used, results flagged",
                    what, len(clean), len(rounds))
    return {key: Timing(tuple(r[key] for r in use), samplers[key].number, load) for key in samplers}


def time_single(sampler: Sampler, cfg: TimingConfig) -> Timing:
    """``cfg.repeat`` samples of one contender in a row (for contenders too slow to interleave).
    ``min_repeat_ms=0``: one call per sample, no calibration."""
    if cfg.min_repeat_ms > 0:
        sampler.calibrate(cfg.min_repeat_ms)
    elif isinstance(sampler, TvmSampler):
        sampler.number, sampler.evaluator = 1, sampler._evaluator(1)
    return Timing(tuple(sampler.sample() for _ in range(cfg.repeat)), sampler.number)


def add_timing_args(parser, repeat: int = 7, min_repeat_ms: float = 40.0) -> None:
    """Options both scripts share: timing, noise control, output, logging."""
    group = parser.add_argument_group("timing")
    group.add_argument("--repeat", type=int, default=repeat,
                       help="interleaved timing rounds per contender (the median is reported)")
    group.add_argument("--min-repeat-ms", type=float, default=min_repeat_ms,
                       help="minimum duration of one contender's sample in a round")
    group.add_argument("--extra-rounds", type=int, default=NOISE.extra_rounds,
                       help="rounds allowed on top of --repeat to replace rounds that other "
                            f"processes disturbed (used more than {FOREIGN_LOAD_LIMIT:g} cores)")
    group.add_argument("--retries", type=int, default=NOISE.retries,
                       help="re-measure a slow contender timed on its own (TVM's untuned default) "
                            "this often when other processes disturbed it")
    group.add_argument("--wait-budget", type=float, default=NOISE.budget_s,
                       help="seconds the whole run may spend waiting for other processes to "
                            "leave the CPUs alone")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output directory; None means benchmarks/results/<machine "
                             "class>, e.g. avx2 (its quick/ subfolder with --quick)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def apply_timing_args(args) -> TimingConfig:
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    NOISE.retries = max(0, args.retries)
    NOISE.extra_rounds = max(0, args.extra_rounds)
    NOISE.budget_s = max(0.0, args.wait_budget)
    if args.out_dir is None:
        args.out_dir = results_dir(quick=args.quick)
    return TimingConfig(args.repeat, args.min_repeat_ms)


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


class AccuracyError(RuntimeError):
    """A contender computed the wrong answer: its timing would be meaningless."""


def rel_max_error(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise AccuracyError(f"shape {got.shape} != reference shape {ref.shape}")
    scale = float(np.max(np.abs(ref))) or 1.0
    return float(np.max(np.abs(got - ref))) / scale


def check_close(name: str, got: np.ndarray, ref: np.ndarray, tol: float = REL_TOL) -> float:
    """Relative max error of ``got``; raises :class:`AccuracyError` when it is ``>= tol``."""
    err = rel_max_error(got, ref)
    if not np.isfinite(err) or err >= tol:
        raise AccuracyError(f"{name}: relative max error {err:.3g} >= {tol:g} against the reference")
    log.debug("%s: relative max error %.2e", name, err)
    return err


# --------------------------------------------------------------------------------------------
# TVM helpers
# --------------------------------------------------------------------------------------------


def to_tvm(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def vm_output(out: Any) -> np.ndarray:
    """The first output of a Relax VM call as numpy."""
    if not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def compile_tvm_default(model: onnx.ModelProto, target: tvm.target.Target) -> tvm.relax.VirtualMachine:
    """TVM's own, untuned flow: import the ONNX model and ``tvm.compile`` it with the default
    Relax pipeline (``relax.get_default_pipeline``), no rewrite of the dense layers."""
    from tvm_scalpel.onnx_io import to_relax

    mod = to_relax(model)
    exe = tvm.compile(mod, target=target, relax_pipeline=tvm.relax.get_default_pipeline(target))
    return tvm.relax.VirtualMachine(exe, tvm.cpu())


# --------------------------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, threads: int):
    """A CPU onnxruntime session with ``threads`` intra-op threads, all graph optimisations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def ort_iobinding_call(sess, x: np.ndarray) -> Callable[[], Any]:
    """A call of ``run_with_iobinding``: input bound once (an OrtValue, like a TVM tensor), the
    output allocated by onnxruntime on the CPU each run and not copied back to numpy — the
    same work ``vm["main"](x_tvm)`` does."""
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")

    def call() -> Any:
        sess.run_with_iobinding(binding)
        return binding

    return call


def ort_sessions(model: onnx.ModelProto, threads: Iterable[int] = (1, 2)) -> dict[int, Any]:
    return {t: ort_session(model, t) for t in threads}


def ort_samplers(sessions: dict[int, Any], x: np.ndarray, style: str = "run"
                 ) -> tuple[dict[int, PythonSampler], np.ndarray]:
    """One sampler per session (intra-op thread count), for :func:`measure_rounds`, and the
    output of the first. Each session is its own runtime family: its threads spin after a run.

    ``style="run"``: ``session.run`` with numpy in and out; ``"iobinding"``: see
    :func:`ort_iobinding_call`.
    """
    samplers: dict[int, PythonSampler] = {}
    output = None
    for t, sess in sessions.items():
        out = ort_run(sess, x)
        output = out if output is None else output
        if style == "run":
            call = (lambda s: lambda: ort_run(s, x))(sess)
        elif style == "iobinding":
            call = ort_iobinding_call(sess, x)
        else:
            raise ValueError(f"unknown onnxruntime call style {style!r}")
        samplers[t] = PythonSampler(call, family=f"onnxruntime session {id(sess)}")
    assert output is not None
    return samplers, output


@dataclass
class OrtBest:
    timing: Timing
    threads: int
    all_timings: dict[int, Timing]


def pick_best_ort(timings: dict[int, Timing]) -> OrtBest:
    """The faster thread count (by median)."""
    best = min(timings, key=lambda t: timings[t].median_us)
    return OrtBest(timings[best], best, dict(timings))


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


# (LLVM feature, folder name), widest first. The figures of an AVX-512 host (g = 16) and an
# AVX2 host (g = 8) differ, so each class keeps its own results and neither overwrites the other.
MACHINE_CLASSES = (("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sse2", "sse2"),
                   ("neon", "neon"))


def machine_class(profile=None) -> str:
    """The machine class of a target profile (default: this host's), named by its widest SIMD
    unit: ``avx512``, ``avx2``, ... (the profile's name for a target without one of them)."""
    from tvm_scalpel.targets import resolve_target

    profile = resolve_target("x86" if profile is None else profile)
    if profile.kind == "llvm":
        for feature, name in MACHINE_CLASSES:
            if tvm.target.codegen.target_has_features(feature, profile.target):
                return name
    return profile.name


def results_dir(profile=None, quick: bool = False) -> Path:
    """Where a benchmark writes by default: ``benchmarks/results/<machine class>/`` (its
    ``quick/`` subfolder for smoke runs)."""
    out = RESULTS_DIR / machine_class(profile)
    return out / "quick" if quick else out


def machine_info(profile=None) -> dict[str, str]:
    import onnxruntime
    import scipy

    from tvm_scalpel.threads import num_threads

    cpu = _lscpu()
    flags = cpu.get("Flags", "").split()
    simd = [f for f in ("avx512f", "avx512vnni", "avx2", "fma") if f in flags]
    info = {
        "CPU": cpu.get("Model name", platform.processor() or "unknown"),
        "LLVM CPU": tvm.target.codegen.llvm_get_system_cpu(),
        "cores usable": str(len(os.sched_getaffinity(0))),
        "SIMD": ", ".join(simd) or "unknown",
        "L2 / L3": f"{cpu.get('L2 cache', '?')} / {cpu.get('L3 cache', '?')}",
        "TVM": tvm.__version__,
        "TVM threads": str(num_threads()),
        "machine class (results folder)": machine_class(),
        "onnxruntime": onnxruntime.__version__,
        "numpy / scipy": f"{np.__version__} / {scipy.__version__}",
        "Python": platform.python_version(),
        "load average at start": " ".join(Path("/proc/loadavg").read_text().split()[:3])
        if Path("/proc/loadavg").exists() else "?",
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": command_line(),
    }
    if profile is not None:
        info["target"] = str(profile.target)
        info["SIMD width (fp32 lanes)"] = str(profile.simd_width)
    return info


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    py = Path(sys.executable)
    try:
        py_text = str(py.relative_to(REPO_ROOT))
    except ValueError:
        py_text = str(py)
    return " ".join([py_text, script_text, *map(shlex.quote, sys.argv[1:])])


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` holds ``"l"`` or ``"r"`` per column (default: the
    first column left, the others right)."""
    rows = [[str(c) for c in row] for row in rows]
    headers = [str(h) for h in headers]
    align = list(align) if align else ["l"] + ["r"] * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.rjust(w) if a == "r" else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                            for w, a in zip(widths, align)) + " |"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def report_header(title: str, script: str, elapsed_s: float, info: dict[str, str]) -> list[str]:
    """The opening lines of a results file: title, what made it and how long it took, machine."""
    return [f"# {title}", "", f"Generated by `benchmarks/{script}` in {elapsed_s / 60:.1f} min.", "",
            "## Machine", "", machine_markdown(info), ""]


def machine_markdown(info: dict[str, str]) -> str:
    return markdown_table(["", ""], [[f"**{k}**", f"`{v}`" if k == "command" else v]
                                     for k, v in info.items()], ["l", "l"])


def fmt_us(us: float | None) -> str:
    if us is None:
        return "–"
    if us >= 1e5:
        return f"{us / 1e3:,.0f} ms"
    if us >= 100:
        return f"{us:,.0f}"
    return f"{us:.1f}"


def fmt_rel(rel: float | None) -> str:
    if rel is None:
        return "–"
    if rel >= 10:
        return f"{rel:.0f}x"
    return f"{rel:.3f}x" if rel < 1 else f"{rel:.2f}x"


def fmt_bytes(n: float) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    log.info("wrote %s", path)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: dict[str, Any] = field(default_factory=dict)


@dataclass
class Panel:
    title: str
    series: list[Series]


def plot_relative(
    path: Path,
    grid: Sequence[Sequence[Panel]],
    xlabel: str = "pruning rate",
    ylabel: str = "relative execution time",
    suptitle: str = "",
    ref_label: str = "onnxruntime dense = 1.0",
    ymax: float | None = None,
) -> None:
    """Relative execution time (onnxruntime dense = 1.0) vs pruning rate, a grid of panels
    (the style of Scalpel's Figures 12 and 15). Values above ``ymax`` are clipped to the top
    edge and annotated with their value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(grid), max(len(r) for r in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols + 0.6, 3.3 * rows + 0.9), squeeze=False)
    handles: dict[str, Any] = {}
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel = row[c]
            top = ymax or max([1.2] + [max(s.y) * 1.1 for s in panel.series if len(s.y)])
            for si, s in enumerate(panel.series):
                ys = np.asarray(s.y, dtype=float)
                shown = np.minimum(ys, top * 0.97)
                (h,) = ax.plot(s.x, shown, label=s.label, **{"marker": "o", "ms": 4, **s.style})
                handles.setdefault(s.label, h)
                for i, (xv, yv) in enumerate(zip(s.x, ys)):
                    flat = s.style.get("marker", "o") is None  # a constant line: label it once
                    if yv > top * 0.97 and (not flat or i == len(ys) - 1):
                        ax.annotate(f"{yv:.1f}", (xv, top * 0.97), textcoords="offset points",
                                    xytext=(0, -10 - 8 * si), ha="center", fontsize=7,
                                    color=h.get_color())  # staggered: series may clip together
            h = ax.axhline(1.0, color="black", lw=1.2, ls="--")
            handles.setdefault(ref_label, h)
            ax.set_ylim(0, top)
            ax.set_title(panel.title, fontsize=10)
            ax.grid(True, alpha=0.3)
            if r == rows - 1:
                ax.set_xlabel(xlabel)
            if c == 0:
                ax.set_ylabel(ylabel)
    width, height = fig.get_size_inches()
    ncol = max(1, min(len(handles), int(width // 2.7)))
    legend_rows = -(-len(handles) // ncol)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=ncol, frameon=False, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0, min(0.4, (0.25 * legend_rows + 0.15) / height), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)
