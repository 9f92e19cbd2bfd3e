"""Group-width autotuning: search logic, the database, and the CLI round trip."""

import json

import numpy as np
import onnx
import pytest
from helpers import assert_whole_groups, group_zero_counts, run_cli
from onnx import numpy_helper

from tvm_scalpel import ScalpelError, models, prune_onnx
from tvm_scalpel.targets import resolve_target
from tvm_scalpel.tuning import Candidate, Task, TuningDatabase, candidates, measure, tune_task


@pytest.fixture
def host():
    return resolve_target("x86")


# Pinned x86 targets: the search logic is checked for both vector widths on any host (nothing
# below runs code for them; the synthetic cost stands in for measuring).
PINNED = {"haswell": 8, "skylake-avx512": 16}


def pinned(cpu: str):
    return resolve_target('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "%s"}' % cpu)


def synthetic_cost(seed: int, best_g: int = 8):
    """A deterministic stand-in for measuring: a smooth cost with one best candidate."""
    rng = np.random.default_rng(seed)
    noise = {}

    def cost(task, cand, profile):
        key = (cand.group_width, cand.unroll, cand.batch_tile, cand.parallel)
        noise.setdefault(key, rng.uniform(0.97, 1.03))
        g_term = abs(np.log2(cand.group_width) - np.log2(best_g))
        return 1e-6 * (1 + g_term + 0.3 * abs(cand.unroll - 2) + 0.5 * cand.parallel) * noise[key]

    return cost


@pytest.mark.parametrize("cpu", PINNED)
def test_candidate_widths_span_one_to_four_vectors(cpu):
    profile = pinned(cpu)
    lanes = PINNED[cpu]
    assert profile.simd_width == lanes
    widths = {c.group_width for c in candidates(Task(64, 4096, 0.9), profile)}
    assert widths == {1, 2, 4, 8, 16, 32} | {2 * lanes, 4 * lanes}  # AVX-512 adds g=64
    # a narrow layer: no group wider than its row
    assert max(c.group_width for c in candidates(Task(64, 24, 0.9), profile)) == 16


def test_candidate_widths_on_the_host(host):
    widths = {c.group_width for c in candidates(Task(64, 4096, 0.9), host)}
    assert {host.simd_width, 2 * host.simd_width, 4 * host.simd_width} <= widths


@pytest.mark.parametrize("vectors", [1, 2, 4])
@pytest.mark.parametrize("cpu", PINNED)
def test_tuner_finds_the_exhaustive_best_group_width(cpu, vectors, tmp_path):
    """Whether the best width is one vector or several, the tuner finds it in 14 trials."""
    profile = pinned(cpu)
    best_g = vectors * profile.simd_width
    task = Task(64, 256, 0.9)
    cost = synthetic_cost(7, best_g)
    space = candidates(task, profile)
    exhaustive = {c: cost(task, c, profile) for c in space}
    best_exhaustive = min(exhaustive.values())
    db = TuningDatabase(tmp_path / "db.jsonl")
    calls = []

    def counted(task, cand, profile):
        calls.append(cand)
        return cost(task, cand, profile)

    best, secs, new = tune_task(task, profile, db, trials=14, measure_fn=counted)
    assert new == len(calls) == 14 < len(space)  # the model cut the measurements
    assert secs <= 1.05 * best_exhaustive
    assert best.group_width == best_g
    # a second run with the same budget measures nothing new
    again = TuningDatabase(tmp_path / "db.jsonl")
    best2, secs2, new2 = tune_task(task, profile, again, trials=14, measure_fn=counted)
    assert (best2, secs2, new2) == (best, secs, 0) and len(calls) == 14


@pytest.mark.parametrize("cpu", PINNED)
def test_prune_auto_takes_a_width_of_several_vectors(cpu, tmp_path):
    """``--group-width auto`` (prune_onnx "auto") takes the tuner's pick of 4 vectors as it is."""
    profile = pinned(cpu)
    g = 4 * profile.simd_width
    model = models.mlp([160, 70, 6], seed=5)
    path = tmp_path / "db.jsonl"
    db = TuningDatabase(path)
    task = Task(70, 160, 0.75)
    cost = synthetic_cost(3, g)
    tune_task(task, profile, db, trials=14, measure_fn=cost)
    out = prune_onnx(model, 0.75, profile, "auto", tuning_db=path)
    assert [layer.group_width for layer in out.layers] == [g, profile.simd_width]  # 2nd: no record
    w = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    assert_whole_groups(w["fc1.weight"], g)
    assert any(0 < z < size for z, size in group_zero_counts(w["fc1.weight"], 2 * g))  # not wider


@pytest.mark.parametrize("g", [32, 64])
def test_kernel_of_several_vectors_matches_numpy(host, rng, g):
    """The widest candidates (4 vectors: g=32 on AVX2, 64 on AVX-512) compute correctly here."""
    from helpers import build_primfunc, dense_ref, ref_prune, rel_err, tensors

    from tvm_scalpel import schedules
    from tvm_scalpel.format import GroupedSparseMatrix
    from tvm_scalpel.schedules import CpuKnobs, pack_grouped_sparse

    n, k = 19, 3 * g + 5
    w, _ = ref_prune(rng.standard_normal((n, k)).astype(np.float32), g, 0.6)
    bias = rng.standard_normal(n).astype(np.float32)
    m = GroupedSparseMatrix.from_dense(w, g)
    packed = pack_grouped_sparse(m)
    for knobs in (CpuKnobs(unroll=2, batch_tile=8), CpuKnobs(unroll=4, batch_tile=4, parallel_gemm=True)):
        fn = build_primfunc(schedules.grouped_sparse_dense(host, n, k, g, m.n_groups, True, knobs), host.target)
        for batch in (1, 9):
            x = rng.standard_normal((batch, k)).astype(np.float32)
            args = tensors(x, packed.values, packed.offsets, packed.indptr, bias,
                           np.full((batch, n), np.nan, np.float32))
            fn(*args)
            assert rel_err(args[-1].numpy(), dense_ref(x, w, bias, relu=True)) < 1e-5


def test_database_survives_corruption_and_keeps_other_targets(host, tmp_path, caplog):
    path = tmp_path / "db.jsonl"
    task = Task(32, 40, 0.8)
    db = TuningDatabase(path)
    cand = Candidate(8, 2, 8, False)
    db.add(task, host, cand, 2e-6)
    other = resolve_target('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}')
    db.add(task, other, Candidate(4, 1, 8, False), 1e-6)
    with open(path, "a") as f:
        f.write('{"key": "broken", "candid\n')  # an interrupted write
        f.write("not json at all\n")
    before = path.read_text()
    loaded = TuningDatabase(path)
    assert "skipped 2 unreadable line" in caplog.text
    assert loaded.best(task, host) == (cand, 2e-6)  # records of another target never mix
    assert loaded.best(task, other) == (Candidate(4, 1, 8, False), 1e-6)
    loaded.add(task, host, Candidate(16, 2, 8, False), 1.5e-6)
    assert path.read_text().startswith(before)  # nothing lost, appended only
    assert loaded.best(task, host)[0].group_width == 16
    with pytest.raises(ScalpelError, match="is a directory"):
        TuningDatabase(tmp_path)


def test_real_measurement_is_positive_and_finite(host):
    secs = measure(Task(24, 40, 0.5), Candidate(8, 2, 8, False), host, min_repeat_ms=1)
    assert 0 < secs < 1e-2


def test_prune_with_tuned_group_widths(host, tmp_path):
    model = models.mlp([48, 40, 24, 6], seed=11)
    path = tmp_path / "db.jsonl"
    db = TuningDatabase(path)
    # pretend the tuner found g=4 fastest for the first layer and g=8 for the second
    db.add(Task(40, 48, 0.75), host, Candidate(4, 2, 8, False), 1e-6)
    db.add(Task(40, 48, 0.75), host, Candidate(16, 2, 8, False), 2e-6)
    db.add(Task(24, 40, 0.75), host, Candidate(8, 1, 8, False), 1e-6)
    out = prune_onnx(model, 0.75, host, "auto", tuning_db=path)
    widths = [layer.group_width for layer in out.layers]
    assert widths == [4, 8, host.simd_width]  # the third layer has no record: SIMD width
    w = {i.name: numpy_helper.to_array(i) for i in out.model.graph.initializer}
    assert_whole_groups(w["fc1.weight"], 4)
    assert_whole_groups(w["fc2.weight"], 8)
    with pytest.raises(ScalpelError, match="needs a tuning database"):
        prune_onnx(model, 0.75, host, "auto")
    with pytest.raises(ScalpelError, match="no such tuning database"):
        prune_onnx(model, 0.75, host, "auto", tuning_db=tmp_path / "missing.jsonl")


def test_cli_tune_then_prune_auto(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(models.mlp([40, 24, 6], seed=2), str(model_path))
    db = tmp_path / "db.jsonl"
    first = run_cli("tune", str(model_path), "--db", str(db), "--rate", "0.75", "--trials", "7", "--quiet")
    assert first.returncode == 0, first.stderr
    # 7 grouped-sparse candidates a layer and our dense kernel once a layer, 2 layers
    assert "fc1.weight" in first.stdout and "16 new measurements" in first.stdout
    records = [json.loads(line) for line in db.read_text().splitlines()]
    assert len(records) == 16 and all(r["seconds"] > 0 for r in records)
    assert sum("candidate" in r for r in records) == 14
    second = run_cli("tune", str(model_path), "--db", str(db), "--rate", "0.75", "--trials", "7", "--quiet")
    assert second.returncode == 0 and "0 new measurements" in second.stdout
    out = tmp_path / "p.onnx"
    pruned = run_cli("prune", str(model_path), "-o", str(out), "--rate", "0.75", "--group-width", "auto",
                     "--db", str(db))
    assert pruned.returncode == 0, pruned.stderr
    bad = run_cli("tune", str(model_path), "--db", str(db), "--target", "aarch64")
    assert bad.returncode == 2 and "cannot run here" in bad.stderr and "--rpc" in bad.stderr
    assert "Traceback" not in bad.stderr
    bad = run_cli("tune", str(model_path), "--db", str(db), "--target", "cuda")
    assert bad.returncode == 2 and "has none yet" in bad.stderr


def test_compile_uses_the_knobs_measured_best(host, tmp_path, rng):
    from tvm_scalpel import compile_onnx

    model = models.mlp([48, 40, 6], seed=4)
    pruned = prune_onnx(model, 0.75, host, 8).model
    path = tmp_path / "db.jsonl"
    db = TuningDatabase(path)
    db.add(Task(40, 48, 0.75), host, Candidate(8, 4, 8, True), 1e-6)
    db.add(Task(40, 48, 0.75), host, Candidate(8, 1, 8, False), 3e-6)
    knobs = db.knobs_for(host, 40, 48, 8, 0.7502)
    assert (knobs.unroll, knobs.parallel_gemv) == (4, True)
    assert db.knobs_for(host, 40, 48, 16, 0.75) is None  # another g: no record
    built = compile_onnx(pruned, host, tuning_db=path)
    specs = [spec for _, spec in built_module_funcs(pruned, host, path)]
    assert [(s["n"], s["unroll"], s["parallel_gemv"]) for s in specs] == [(40, 4, 1), (6, 2, 0)]
    from helpers import ort_run, rel_err, vm_run

    x = rng.standard_normal((3, 48)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(pruned, x)) < 1e-4


def built_module_funcs(model, host, path):
    """The layer specs our kernels were built with (read back from the rewritten module)."""
    import tvm

    from tvm_scalpel.onnx_io import to_relax
    from tvm_scalpel.passes import RewriteDenseLayers
    from tvm_scalpel.tuning import TuningDatabase

    db = TuningDatabase(path)
    mod = RewriteDenseLayers(host, knobs_for=lambda n, k, g, r: db.knobs_for(host, n, k, g, r))(to_relax(model))
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and "scalpel.layers" in func.attrs:
            for layer in func.attrs["scalpel.layers"]:
                yield gv, {str(k): int(v) for k, v in dict(layer).items()}
