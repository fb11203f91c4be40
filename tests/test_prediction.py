"""Step time predicted from an analysis and a preset's hardware: compute at peak, memory at HBM
bandwidth, each collective on the slowest link it crosses, with and without overlap, and a
pipeline's bubble."""

import dataclasses

import pytest

from mlsys_jax.analysis import Analysis, CollectiveRow, Compiled, analyze
from mlsys_jax.analysis.prediction import predict

#: cpu-8's nominal hardware: 2e10 FLOP/s, 1e10 B/s HBM, one host link of 1e10 B/s and 1e-5 s.
ALL_REDUCE = CollectiveRow("all-reduce", "f32", 10**6, ("data",), 3, (), group_size=2, traffic_bytes=1e6)


def synthetic(**changes) -> Analysis:
    base = Analysis(
        model="tiny",
        mesh={"data": 2, "fsdp": 2, "tensor": 2},
        strategy="dp_fsdp_tp",
        batch=4,
        seq=100,
        microbatches=1,
        schedule=None,
        devices=8,
        hardware="cpu-8",
        flops_per_token=1e6,
        bubble=0.0,
        param_bytes=0,
        grad_bytes=0,
        opt_state_bytes=0,
        activations=0,
        hbm=None,
        stage_activations=(),
        compiled=Compiled(0, 0, 0, 0, 0.0, 1e6, 0.0, bytes_per_step=1e7),
        collectives=(ALL_REDUCE,),
    )
    return dataclasses.replace(base, **changes)


def test_each_part_is_priced_on_the_presets_hardware():
    p = predict(synthetic())
    assert p.compute_s == pytest.approx(4e8 / 8 / 2e10)  # 400 tokens x 1e6 FLOPs over 8 devices
    assert p.memory_s == pytest.approx(1e7 / 1e10)
    assert p.comm_s == pytest.approx(3 * (1e-5 * 2 + 1e6 / 1e10))  # 3 runs of 2(n-1) steps and the traffic
    assert p.serial_s == pytest.approx(p.compute_s + p.comm_s)
    assert p.overlapped_s == pytest.approx(p.compute_s)
    assert p.mfu() == pytest.approx(4e8 / (8 * 2e10 * p.serial_s))
    assert p.tokens_per_s(overlapped=True) == pytest.approx(400 / p.compute_s)


def test_a_pipeline_idles_for_its_bubble():
    flat, piped = predict(synthetic()), predict(synthetic(bubble=0.25))
    assert piped.serial_s == pytest.approx(flat.serial_s / 0.75)
    assert piped.mfu() == pytest.approx(flat.mfu() * 0.75)


def test_a_plan_without_hardware_needs_a_preset_named():
    with pytest.raises(ValueError, match="names no hardware. Fix: pass a preset"):
        predict(synthetic(hardware=None))
    assert predict(synthetic(hardware=None), "gpu-h100x8").compute_s < predict(synthetic()).compute_s


def test_a_compiled_plan_on_a_preset_gets_a_whole_prediction():
    a = analyze(model="small", mesh="cpu-8", batch=16, seq=128)
    p = predict(a)
    assert a.hardware == "cpu-8" and a.collectives
    assert p.compute_s > 0 and p.memory_s > 0 and p.comm_s > 0
    assert p.overlapped_s <= p.serial_s and 0 < p.mfu() <= 1
