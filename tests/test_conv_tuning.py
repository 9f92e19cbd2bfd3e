"""``tune`` on conv layers: knob candidates of the blocked conv kernel timed per conv shape,
recorded in the tuning database, and ``compile --db`` building each layer with the fastest."""

import json

import numpy as np
import pytest
import tvm
from helpers import make_model, ort_run, rel_err, run_cli, vm_run
from onnx import helper, numpy_helper

from tvm_scalpel import compile_onnx, flows, schedules
from tvm_scalpel.conv_tuning import conv_candidates, conv_key
from tvm_scalpel.schedules import ConvShape, conv_cpu
from tvm_scalpel.targets import resolve_target
from tvm_scalpel.tuning import TuningDatabase

PROFILE = resolve_target("x86")


def conv_net(rng, batch="N"):
    """Two convs of different shapes, then global pooling and a Gemm: what tune sees in a CNN."""
    w1 = (rng.standard_normal((24, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((40, 24, 3, 3)) * 0.1).astype(np.float32)
    wf = (rng.standard_normal((10, 40)) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (wf, "wf"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]
    return make_model(nodes, inits, [("x", [batch, 3, 12, 12])], [("y", [batch, 10])])


@pytest.mark.parametrize("shape", [
    ConvShape(1, 13, 9, 8, 37, 3, 3, (1, 1), (1, 0, 1, 1)),
    ConvShape(1, 3, 17, 17, 16, 7, 7, (2, 2), (3, 3, 3, 3)),
    ConvShape(1, 12, 8, 8, 12, 3, 3, (1, 1), (1, 1, 1, 1), groups=12),
], ids=["odd channels", "rgb stem", "depthwise"])
def test_every_candidate_computes_the_convolution(rng, shape):
    """The tuner may pick any candidate: each must be right, against a float64 convolution."""
    cands = conv_candidates(PROFILE, shape)
    assert cands[0] == schedules.default_conv_knobs(PROFILE, shape) and len(set(cands)) == len(cands) >= 3
    ci = shape.in_channels // shape.groups
    w = rng.standard_normal((shape.out_channels, ci, shape.kh, shape.kw)).astype(np.float32)
    x = rng.standard_normal((1, shape.in_channels, shape.height, shape.width)).astype(np.float32)
    pt, pl, pb, pr = shape.padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = shape.out_size
    sh, sw = shape.strides
    ref = np.zeros((1, shape.out_channels, oh, ow))
    per = shape.out_channels // shape.groups
    for o in range(shape.out_channels):
        g = o // per
        for i in range(oh):
            for j in range(ow):
                patch = xp[0, g * ci:(g + 1) * ci, i * sh:i * sh + shape.kh, j * sw:j * sw + shape.kw]
                ref[0, o, i, j] = np.sum(patch * w[o])
    dev = tvm.cpu()
    for knobs in cands:
        func = schedules.conv2d(PROFILE, shape, knobs).with_attr("global_symbol", "main")
        f = tvm.compile(tvm.IRModule({"main": func}), target=PROFILE.target)["main"]
        out = tvm.runtime.tensor(np.zeros(ref.shape, np.float32), dev)
        f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(schedules.pack_conv_weight(w, shape, knobs), dev),
          tvm.runtime.tensor(schedules.pack_conv_bias(None, shape, knobs), dev), out)
        assert rel_err(out.numpy(), ref) < 1e-4, knobs


def test_tune_convs_records_each_shape_and_compile_uses_the_fastest(rng, tmp_path, monkeypatch):
    model = conv_net(rng)
    db_path = tmp_path / "db.jsonl"
    results = flows.tune_convs(model, db_path, trials=3, progress=False)
    assert len(results) == 2 and all(r.new_trials == 3 for r in results)
    db = TuningDatabase(db_path)
    for r in results:
        times = db.conv_times(PROFILE, r.shape)
        assert len(times) == 3 and r.best == min(times, key=times.get) and r.seconds == min(times.values())
        assert r.rule_seconds == times[schedules.default_conv_knobs(PROFILE, r.shape)]
    assert sum(r.new_trials for r in flows.tune_convs(model, db_path, trials=3, progress=False)) == 0

    # a record naming other knobs as the fastest: compile --db must build the layer with them
    shape = results[1].shape
    chosen = conv_cpu.ConvKnobs(oc_block=PROFILE.simd_width, ic_block=8, ow_tile=3)
    with open(db_path, "a") as f:
        f.write(json.dumps({"key": conv_key(PROFILE, shape), "conv": chosen.__dict__, "seconds": 1e-9}) + "\n")
    used = []
    real = schedules.conv2d
    monkeypatch.setattr(schedules, "conv2d", lambda p, s, k=None, **kw: used.append((s, k)) or real(p, s, k, **kw))
    built = compile_onnx(model, "x86", tuning_db=db_path)
    assert (chosen in [k for s, k in used if s.in_channels == 24])
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert rel_err(vm_run(built.executable, x), ort_run(model, x)) < 1e-4


def test_cli_tune_prints_the_conv_table_and_takes_a_conv_only_model(rng, tmp_path):
    import onnx

    model = conv_net(rng)
    # Network-in-Network has no FC layer: its convs are still tuned
    graph = model.graph
    del graph.node[-2:]
    graph.node[-1].output[0] = "y"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 40, 6, 6]))
    del graph.initializer[-1]
    onnx.save(model, tmp_path / "m.onnx")
    res = run_cli("tune", tmp_path / "m.onnx", "--db", tmp_path / "db.jsonl", "--conv-trials", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "channel block" in res.stdout and "4 new measurements" in res.stdout


def test_tune_table_names_the_algorithm_with_the_filter_size():
    shape = ConvShape(1, 96, 16, 16, 192, 5, 5, (1, 1), (2, 2, 2, 2))
    knobs = schedules.default_conv_knobs(PROFILE, shape)
    row = flows.ConvTuneResult("conv4.weight", shape, knobs, 5e-4, 1e-3, 2).row()
    assert row[:3] == ["conv4.weight", "192x96x5x5 @16x16", "Winograd F(2x2, 5x5)"]
    assert row[-2:] == ["2.00x", 2]
    direct = flows.ConvTuneResult("c", shape, schedules.default_conv_knobs(PROFILE, shape, winograd=False),
                                  1e-3, None, 0).row()
    assert direct[2] == "direct" and direct[-2] == "-"


def test_time_conv_times_blocked_and_grouped_layers():
    """Blocked in and out for a dense conv, NCHW for a depthwise one; both a plausible time."""
    from tvm_scalpel.conv_tuning import time_conv

    for shape in (ConvShape(1, 24, 10, 10, 40, 3, 3, (1, 1), (1, 1, 1, 1)),
                  ConvShape(1, 12, 8, 8, 12, 3, 3, (1, 1), (1, 1, 1, 1), groups=12)):
        seconds = time_conv(PROFILE, shape, schedules.default_conv_knobs(PROFILE, shape), repeat=3)
        assert 0 < seconds < 0.1


def test_a_rule_timed_slow_once_is_timed_again_and_kept(tmp_path, monkeypatch):
    """One slow timing of the rule's knobs (a busy moment) must not hand the layer to others."""
    from tvm_scalpel import conv_tuning

    shape = ConvShape(1, 24, 10, 10, 40, 3, 3, (1, 1), (1, 1, 1, 1))
    rule = schedules.default_conv_knobs(PROFILE, shape)
    calls = []

    def fake_time(profile, s, knobs, **kw):
        calls.append(knobs)
        if knobs == rule:
            return 3e-3 if calls.count(rule) == 1 else 1e-3
        return 2e-3

    monkeypatch.setattr(conv_tuning, "time_conv", fake_time)
    db = TuningDatabase(tmp_path / "db.jsonl")
    best, seconds, rule_seconds, new = conv_tuning.tune_conv(PROFILE, shape, db, trials=4)
    assert new == 4 and best == rule and seconds == rule_seconds == 1e-3
    assert calls.count(rule) == 1 + conv_tuning.CONFIRM_ROUNDS
    assert db.conv_knobs_for(PROFILE, shape) == rule
    calls.clear()
    assert conv_tuning.tune_conv(PROFILE, shape, db, trials=4)[3] == 0 and not calls  # nothing new
