"""meta_schedule for the layers that stay dense.

A layer that the policy or the measurements leave dense still needs a fast kernel. We have our
own (``schedules.cpu_kernels``); TVM's meta_schedule can search one too. ``tune_dense`` searches a
schedule of the layer's workload ``y[B, N] = x[B, K] @ W[N, K].T + b`` at a fixed batch with
meta_schedule (its records go to a meta_schedule database directory beside our tuning
database), times the best one and our dense kernel the same way, and records both times in our
database. ``tuned_dense_kernel`` gives the searched kernel back at compile time, for the layers
where it measured faster. A fixed batch is what meta_schedule tunes: a model with a symbolic
batch keeps our kernel (``tvm-scalpel compile --batch B`` fixes it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import tvm
from tvm import te

from .errors import ScalpelError
from .targets import TargetProfile

log = logging.getLogger("tvm_scalpel.tuning")


def ms_work_dir(tuning_db: str | os.PathLike) -> Path:
    """meta_schedule's own database lives in a directory beside ours: ``DB.ms/``."""
    return Path(f"{tuning_db}.ms")


def workload(batch: int, n: int, k: int) -> tvm.IRModule:
    """The dense layer as TVM's TE writes it, with the operands of our dense kernel."""
    x = te.placeholder((batch, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="weight")
    b = te.placeholder((n,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="k")
    dot = te.compute((batch, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="dense")
    y = te.compute((batch, n), lambda i, j: dot[i, j] + b[j], name="bias_add")
    return tvm.IRModule({"main": te.create_prim_func([x, w, b, y])})


def _ms_target(profile: TargetProfile) -> tvm.target.Target:
    """meta_schedule needs the core count in the target."""
    config = dict(profile.target.export())
    config.setdefault("num-cores", os.cpu_count() or 1)
    return tvm.target.Target(config)


# A build runs in a fresh worker process, which imports TVM first (about 10 s on a busy 2-core
# host): meta_schedule's 30 s default leaves too little.
BUILD_TIMEOUT_S = 180


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params=None):
    """meta_schedule's default build, less its ``import tvm.s_tir.tensor_intrin``: that import
    registers every tensor intrinsic of every target and took 30 s to 2 minutes per worker on a
    busy 2-core AMD host, so each of meta_schedule's builds timed out (30 s) and it found "no
    valid schedule". An fp32 dense layer tensorizes nothing; the rest is the default's."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _database(work_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(work_dir / "database_workload.json"),
                                    path_tuning_record=str(work_dir / "database_tuning_record.json"),
                                    allow_missing=True)


def tuned_dense_kernel(profile: TargetProfile, batch: int, n: int, k: int,
                       work_dir: str | os.PathLike) -> tvm.tirx.PrimFunc | None:
    """The best schedule meta_schedule found for the workload, or None if it has none."""
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    if not (work_dir / "database_tuning_record.json").exists():
        return None
    try:
        sch = ms.tir_integration.compile_tir(_database(work_dir), workload(batch, n, k), _ms_target(profile))
    except Exception as err:  # an unreadable database: fall back to our kernel, do not crash
        log.warning("%s: meta_schedule database unreadable (%s): our dense kernel for %dx%d",
                    work_dir, str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__, n, k)
        return None
    if sch is None:
        return None
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _time(profile: TargetProfile, func: tvm.tirx.PrimFunc, batch: int, n: int, k: int) -> float:
    from .tuning import time_kernel

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((batch, k), (n, k), (n,))]
    return time_kernel(profile, func, arrays + [np.zeros((batch, n), np.float32)])


def tune_dense(profile: TargetProfile, batch: int, n: int, k: int, trials: int,
               work_dir: str | os.PathLike) -> dict[str, float]:
    """Search the dense layer's schedule with meta_schedule (``trials`` candidates); seconds per
    call of its best and of our dense kernel, timed alike: ``{"meta_schedule": s, "ours": s}``;
    ``{"ours": s}`` alone, with a warning, if no candidate built and ran."""
    from tvm.s_tir import meta_schedule as ms

    from . import schedules

    if profile.name != "x86":
        raise ScalpelError("meta_schedule tunes dense layers on this machine: use --target x86")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mod = workload(batch, n, k)
    target = _ms_target(profile)
    quiet = not log.isEnabledFor(logging.DEBUG)  # meta_schedule logs every round at INFO
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    level = ms_log.level
    if quiet:
        ms_log.setLevel(logging.WARNING)
    try:
        try:
            database = _database(work_dir)
        except Exception:
            raise ScalpelError(f"{work_dir}: meta_schedule's database is unreadable; move it away "
                               "to tune again") from None
        builder = ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=BUILD_TIMEOUT_S)
        ms.tune_tir(mod, target, str(work_dir), max_trials_global=trials,
                    num_trials_per_iter=min(trials, 16), database=database, builder=builder)
    finally:
        ms_log.setLevel(level)
    tuned = tuned_dense_kernel(profile, batch, n, k, work_dir)
    ours = _time(profile, schedules.dense(profile, n, k, relu=False), batch, n, k)
    if tuned is None:  # every candidate failed to build or run: the layer keeps our kernel
        log.warning("meta_schedule found no valid schedule for the %dx%d dense layer in %d trials "
                    "(its logs: %s): our dense kernel", n, k, trials, work_dir / "logs")
        return {"ours": ours}
    return {"meta_schedule": _time(profile, tuned, batch, n, k), "ours": ours}
