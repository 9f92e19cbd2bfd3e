"""Tuning the blocked conv kernel: its knobs measured per conv shape on this machine.

The rule (``schedules.default_conv_knobs``) is close to the best on most layers, but not on
all: on AVX-512 the best output tile of a strided RGB stem, the channel block of a 7x7 layer
and the task order of a large image differ by 5-40% from it, and where Winograd starts to pay
is a threshold. ``tune`` times a few candidates around the rule (Winograd or direct for 3x3
stride-1 layers, output tile, channel block, kw unrolling, cache blocking, task order) for
each conv shape of the model and records them in the tuning database; ``compile --db`` builds
each layer with the fastest recorded knobs (the rule where the database has none).

Records are JSON lines ``{"key": [...], "conv": {knobs}, "seconds": s}``, keyed by the target
and the whole conv shape at its batch (a model with a free batch looks up batch 1).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import numpy as np

from .targets import TargetProfile

log = logging.getLogger("tvm_scalpel.tuning")


def conv_key(profile: TargetProfile, shape) -> str:
    batch = shape.batch if isinstance(shape.batch, int) else 1
    return json.dumps([str(profile.target), "conv", batch, shape.in_channels, shape.height,
                       shape.width, shape.out_channels, shape.kh, shape.kw, list(shape.strides),
                       list(shape.padding), list(shape.dilation), shape.groups])


def conv_candidates(profile: TargetProfile, shape) -> list:
    """The rule's knobs first, then variants of it, without repeats: for a 3x3 or 5x5 stride-1 layer
    the direct kernel and each Winograd tile; the (direct) output tile a few pixels either way, the channel block of one, two or four vectors (with the tile the
    registers then allow), kw unrolled or not, the other task order, cache blocking on / off."""
    from .schedules import conv_winograd, default_conv_knobs

    base = default_conv_knobs(profile, shape)
    lanes = max(profile.simd_width, 1)
    out = [base]

    def add(knobs) -> None:
        if knobs.ow_tile >= 1 and knobs not in out:
            out.append(knobs)

    if shape.depthwise:
        for tile in (base.ow_tile - 2, base.ow_tile + 2, base.ow_tile // 2):
            add(replace(base, ow_tile=max(1, tile)))
        return out
    if conv_winograd.supports(shape):
        # the other algorithm first (the rule's Winograd choice is a threshold), then the other
        # Winograd tile size, then variants of the direct kernel
        direct = default_conv_knobs(profile, shape, winograd=False)
        add(direct)
        for m in conv_winograd.tiles_for(shape):
            add(conv_winograd.winograd_knobs(shape, direct, m))
        base = direct
    vectors = base.oc_block // lanes
    ocg = shape.out_channels // shape.groups
    for tile in (base.ow_tile - 2, base.ow_tile - 4, max(1, base.ow_tile // 2), base.ow_tile + 2):
        add(replace(base, ow_tile=max(1, tile)))
    add(replace(base, unroll_kw=not base.unroll_kw))
    add(replace(base, unroll_kw=not base.unroll_kw, ow_tile=max(1, base.ow_tile // 2)))
    if ocg > 2 * lanes:  # four vectors of output channels, half the tile
        add(replace(base, oc_block=4 * lanes, ow_tile=max(1, base.ow_tile * vectors // 4)))
    if vectors == 2:  # one vector, twice the tile
        add(replace(base, oc_block=lanes, ow_tile=base.ow_tile * 2))
    add(replace(base, positions_outer=not base.positions_outer))
    if base.tiles_per_task > 1:
        add(replace(base, tiles_per_task=1, ic_step=0))
        add(replace(base, tiles_per_task=base.tiles_per_task * 2))
    else:
        oh, ow = shape.out_size
        tiles = -(-oh * ow // base.ow_tile)
        if tiles > 1:  # every tile of an image in one task, the weights streamed once
            add(replace(base, tiles_per_task=min(tiles, 8), ic_step=1))
    return out


def time_conv(profile: TargetProfile, shape, knobs, seed: int = 0, repeat: int = 9) -> float:
    """Seconds per call of the blocked conv kernel for ``shape`` built with ``knobs`` (random
    weights and input; the batch of a free-batch shape is 1).

    The kernel is timed as a model runs it: its input and output in the blocked layout (as
    between two conv layers: the NCHW variant times the layout changes too, and picked task
    orders and tiles that were slower in the model), and each call starts with the weights
    (every argument but the input) flushed from the caches, as the other layers' weights
    pass through them between two calls in a model (timed hot, F(4x4) Winograd's 4x larger
    weights stay in cache, and it wins layers at 14 and 7 that it loses in the model). A
    grouped conv is timed in NCHW, the layout it takes."""
    import tvm

    from .schedules import Blocked, ConvIO, conv2d, conv_output_layout, pack_conv_bias, pack_conv_weight

    if not isinstance(shape.batch, int):
        shape = replace(shape, batch=1)
    n, c, h, w = shape.batch, shape.in_channels, shape.height, shape.width
    oh, ow = shape.out_size
    rng = np.random.default_rng(seed)
    if shape.groups == 1:
        io = ConvIO(data=Blocked(knobs.ic_block, h * w), blocked_out=True)
        x = rng.standard_normal((n, -(-c // knobs.ic_block), h * w, knobs.ic_block))
        layout = conv_output_layout(shape, knobs)
        out_shape = (n, -(-shape.out_channels // layout.block), layout.positions, layout.block)
    else:
        io = ConvIO()
        x = rng.standard_normal((n, c, h, w))
        out_shape = (n, shape.out_channels, oh, ow)
    func = conv2d(profile, shape, knobs, relu=True, io=io).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=profile.target)
    weight = rng.standard_normal((shape.out_channels, c // shape.groups, shape.kh, shape.kw))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.asarray(a, np.float32), dev) for a in (
        x, pack_conv_weight(weight.astype(np.float32), shape, knobs), pack_conv_bias(None, shape, knobs),
        np.zeros(out_shape, np.float32))]
    timer = lib.mod.time_evaluator("main", dev, number=1, repeat=repeat,
                                   f_preproc="cache_flush_cpu_non_first_arg")
    return float(np.median(timer(*args).results))


def knobs_from(record: dict):
    from .schedules import ConvKnobs

    return ConvKnobs(**record)


CONFIRM_ROUNDS = 2  # re-timings of the finalists after a sweep


def tune_conv(profile: TargetProfile, shape, db, trials: int, progress=None):
    """Measure candidates for ``shape`` until ``trials`` are known in ``db`` (the rule's knobs
    always among them); returns ``(best knobs, seconds, rule's seconds, new measurements)``.

    After a sweep that measured something, the two fastest and the rule's knobs are timed again,
    in turns (:data:`CONFIRM_ROUNDS`), and every time is recorded (the database keeps each
    knob's fastest). On a shared machine one timing can be 30% slow; a rule timed slow once
    handed layers to knobs that were slower in the model."""
    from .schedules import default_conv_knobs

    known = db.conv_times(profile, shape)
    rule = default_conv_knobs(profile, shape)
    new = 0
    for knobs in conv_candidates(profile, shape)[:max(trials, 1)]:
        if knobs in known:
            continue
        seconds = time_conv(profile, shape, knobs)
        db.add_conv(profile, shape, knobs, seconds)
        known[knobs] = seconds
        new += 1
        if progress is not None:
            progress.update(1)
    if new:
        finalists = list(dict.fromkeys(sorted(known, key=known.get)[:2] + [rule]))
        for _ in range(CONFIRM_ROUNDS if len(finalists) > 1 else 0):
            for knobs in finalists:
                seconds = time_conv(profile, shape, knobs)
                db.add_conv(profile, shape, knobs, seconds)
                known[knobs] = min(known[knobs], seconds)
    best = min(known, key=known.get)
    return best, known[best], known.get(rule), new


def record(profile: TargetProfile, shape, knobs, seconds: float, unit: str = "seconds") -> dict:
    return {"key": conv_key(profile, shape), "conv": asdict(knobs), unit: seconds}
