"""``tune --target cortex-m4``: candidates measured by instruction count under qemu, in the
same database as other targets, and ``prune --group-width auto`` taking g from it.

The project generator is replaced by tests/mcu_projects.fake_generator (dense and grouped-sparse
C kernels of one layer, g unrolled, as the generator writes them), so these tests check the
tuner and the counter, not the generator. Needs ``make setup-mcu``; skipped without.
"""

import json

import numpy as np
import pytest
from helpers import run_cli
from mcu_projects import fake_generator, sparse_project

from tvm_scalpel import ScalpelError, flows, models
from tvm_scalpel.mcu.firmware import mcu_ready, run_project
from tvm_scalpel.mcu.layer_cost import layer_model
from tvm_scalpel.pruning import prune_groups
from tvm_scalpel.targets import resolve_target
from tvm_scalpel.tuning import MCU_GROUP_WIDTHS, Task, TuningDatabase

REASON = mcu_ready()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)

SIZES = [64, 32, 10]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(flows, "_mcu_compile", fake_generator)


def test_fake_generator_is_right(rng, tmp_path):
    """The stand-in must compute the layer, or the counts below mean nothing."""
    w = prune_groups(rng.standard_normal((12, 40)).astype(np.float32), 4, 0.8).weight
    x = rng.standard_normal((3, 40)).astype(np.float32)
    y = run_project(sparse_project(tmp_path / "p", w, 4), x).outputs
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


def test_tune_counts_instructions_and_picks_g(fake, tmp_path):
    db_path = tmp_path / "m4.jsonl"
    model = models.mlp(SIZES, seed=3, layout="gemm")
    results = flows.tune(model, db_path, target="cortex-m4", rate=0.9, trials=16, progress=False)
    assert [r.shape for r in results] == [(32, 64), (10, 32)]
    profile = resolve_target("cortex-m4")
    db = TuningDatabase(db_path)
    for r in results:
        assert r.unit == "instructions"
        known = db.lookup(Task(*r.shape, 0.9), profile)
        # every width that fits the row was counted, once (counts are exact: no repeats)
        assert sorted(c.group_width for c in known) == [g for g in MCU_GROUP_WIDTHS if g <= r.shape[1]]
        assert r.best.group_width == min(known, key=known.get).group_width
        assert r.sparse_seconds == min(known.values()) and r.sparse_seconds == int(r.sparse_seconds)
        # at 90% the sparse layer does far less work than dense; a wider group saves index loads
        assert r.sparse_seconds < 0.5 * r.dense_seconds["ours"]
        assert known[next(c for c in known if c.group_width == 4)] < known[next(c for c in known if c.group_width == 1)]
    records = [json.loads(line) for line in db_path.read_text().splitlines()]
    assert all("instructions" in rec and "seconds" not in rec for rec in records)
    # a second run with the same budget measures nothing new
    again = flows.tune(model, db_path, target="cortex-m4", rate=0.9, trials=16, progress=False)
    assert sum(r.new_trials for r in again) == 0
    table = flows.tune_headers(again)
    assert "sparse instructions" in table

    # prune --group-width auto takes each layer's best g from the database
    pruned = flows.prune(model, 0.9, target="cortex-m4", group_width="auto", db=db_path)
    chosen = {layer.name: layer.group_width for layer in pruned.weights.layers}
    assert list(chosen.values()) == [r.best.group_width for r in results]


def test_tune_last_layer_at_its_own_rate(fake, tmp_path):
    """prune --last-layer-rate prunes the class scores less; tune must key them at that rate,
    or prune --group-width auto finds no record for the last layer."""
    db_path = tmp_path / "m4.jsonl"
    model = models.mlp(SIZES, seed=4, layout="gemm")
    results = flows.tune(model, db_path, target="cortex-m4", rate=0.9, last_layer_rate=0.6,
                         trials=16, progress=False)
    profile = resolve_target("cortex-m4")
    db = TuningDatabase(db_path)
    assert db.lookup(Task(*results[0].shape, 0.9), profile)
    assert db.lookup(Task(*results[-1].shape, 0.6), profile)
    assert not db.lookup(Task(*results[-1].shape, 0.9), profile)
    for r, rate in zip(results, (0.9, 0.6)):
        assert db.knobs_for(profile, *r.shape, r.best.group_width, rate) is not None


def test_tune_count_is_the_runner_count(fake, tmp_path, rng):
    """The database's number is what the runner counts for that layer."""
    db_path = tmp_path / "m4.jsonl"
    model = models.mlp([32, 16], seed=5, layout="gemm")
    (result,) = flows.tune(model, db_path, target="cortex-m4", rate=0.75, trials=16, progress=False)
    w = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    g = result.best.group_width
    project = tmp_path / "layer"
    fake_generator(layer_model(prune_groups(w, g, 0.75).weight), project, "sparse")
    assert run_project(project, np.zeros((1, 32), np.float32)).per_call == result.sparse_seconds


def test_tune_cortex_m4_refuses_rpc_and_batch(tmp_path):
    model = models.mlp([32, 16], seed=5, layout="gemm")
    for kwargs in ({"rpc": "127.0.0.1:9"}, {"batch": 4}):
        with pytest.raises(ScalpelError, match="measured here under qemu"):
            flows.tune(model, tmp_path / "db.jsonl", target="cortex-m4", progress=False, **kwargs)
    res = run_cli("tune", "lenet-300-100", "--target", "cortex-m4", "--db", tmp_path / "db.jsonl",
                  "--batch", "2")
    assert res.returncode == 2 and "measured here under qemu" in res.stderr


def test_tune_with_the_real_generator(tmp_path):
    """The same on the generator's own kernels, where this checkout has the generator."""
    pytest.importorskip("tvm_scalpel.mcu.project", reason="the Cortex-M4 project generator "
                        "(tvm_scalpel/mcu/project.py) is not in this checkout")
    model = models.mlp([64, 16], seed=7, layout="gemm")
    (result,) = flows.tune(model, tmp_path / "db.jsonl", target="cortex-m4", rate=0.9,
                           progress=False)
    assert result.unit == "instructions" and result.best is not None
    assert result.sparse_seconds < result.dense_seconds["ours"]
