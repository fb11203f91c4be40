"""The calibrated cost model: least-squares fits that recover known figures, a calibration file
that round-trips and fails one clear way, a preset that ``predict`` prices a plan on with the
host's way of combining a step's parts, and a real (tiny) calibration and validation."""

import dataclasses
import json
import math

import pytest

from mlsys_jax.analysis import analyze
from mlsys_jax.analysis.calibration import (
    Calibration,
    CalibrationError,
    Point,
    calibrate,
    calibration_table,
    fit_alpha_beta,
    fit_rate,
    load,
    validate,
    validation_table,
)
from mlsys_jax.analysis.collectives import ring_traffic
from mlsys_jax.analysis.cost import ring_steps
from mlsys_jax.analysis.prediction import Execution, HostPreset, predict
from mlsys_jax.meshes import AXIS_NAMES

TINY_PLAN = {"model": "tiny", "mesh": "data=8", "batch": 8, "seq": 32}


def synthetic(**changes) -> Calibration:
    base = {
        "devices": 8,
        "platform": "cpu",
        "host": "test host",
        "jax_version": "0",
        "created": "2025-01-01T00:00:00+00:00",
        "matmul_flops": 5e10,
        "matmul_overhead_s": 1e-4,
        "memory_bandwidth": 2e9,
        "memory_overhead_s": 1e-4,
        "fresh_bandwidth": 5e8,
        "memory_bytes": 1 << 31,
        "latency": 1e-5,
        "bandwidth": 3e9,
        "collective_start_s": 3e-4,
        "dispatch_s": 5e-5,
        "overlap": 0.0,
        "comm_overlap": 0.0,
        "bubble_share": 0.0,
        "loop_count_ratio": 0.25,
        "points": (
            Point("matmul", "bf16", 256, 2.0 * 256**3, 1e-3, fitted=1.1e-3),
            Point("collective", "all-reduce", 1024, 1792.0, 4e-4, fitted=3.9e-4, steps=14, count=1),
            Point("dispatch", "empty program", 4, 0.0, 5e-5),
        ),
    }
    return Calibration(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny_analysis():
    return analyze(**TINY_PLAN)


@pytest.fixture(scope="module")
def measured(devices):
    """A real calibration with few, small sizes: seconds, not the default's tens of seconds."""
    return calibrate(
        devices,
        matmul_sizes=(64, 128),
        memory_mib=(0.25, 0.5),
        message_bytes=(1 << 10, 1 << 14),
        repeats=2,
        chain=2,
    )


def test_the_fits_recover_known_latency_bandwidth_and_rate():
    latency, bandwidth, start = 2e-5, 3e9, 3e-4
    steps, traffic = [], []
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "collective-permute"):
        for payload in (1 << 10, 1 << 16, 1 << 20, 1 << 24):
            steps.append(ring_steps(kind, 8))
            traffic.append(ring_traffic(kind, payload, 8))
    seconds = [latency * s + t / bandwidth for s, t in zip(steps, traffic)]
    assert fit_alpha_beta(steps, traffic, seconds) == pytest.approx((0.0, latency, bandwidth), rel=1e-6)
    started = [start + s for s in seconds]
    assert fit_alpha_beta(steps, traffic, started, intercept=True) == pytest.approx(
        (start, latency, bandwidth), rel=1e-6
    )
    work = [2.0 * m**3 for m in (128, 256, 512, 1024)]
    assert fit_rate(work, [1e-4 + w / 4e10 for w in work]) == pytest.approx((4e10, 1e-4), rel=1e-6)


def test_a_calibration_survives_its_file(tmp_path):
    cal = synthetic(points=(*synthetic().points, Point("sharing", "matmul on 4 devices", 512, 1.0, 2e-3)))
    path = cal.save(tmp_path / "deep" / "calibration.json")
    assert json.loads(path.read_text())["format"] == 1  # plain JSON: the unfitted point's NaN is null
    back = load(path)
    assert back.to_json() == cal.to_json()
    assert math.isnan(back.points[-1].fitted) and back.points[0] == cal.points[0]
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temporary file left
    assert back.residuals()["matmul"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "no calibration file"),
        ('{"format": 1, "devices": 8', "damaged"),
        ("[1, 2, 3]", "damaged"),
        (json.dumps({**synthetic().to_json(), "format": 99}), "damaged .*format 99"),
        (
            json.dumps({k: v for k, v in synthetic().to_json().items() if k != "bandwidth"}),
            "damaged .*missing bandwidth",
        ),
        (json.dumps({**synthetic().to_json(), "matmul_flops": -1.0}), "damaged .*matmul_flops must be positive"),
        (json.dumps({**synthetic().to_json(), "overlap": 3.0}), "damaged .*overlap must be within"),
        (b"\x00\xff\xfe", "damaged"),
    ],
)
def test_a_missing_or_damaged_file_gives_one_clear_error(tmp_path, content, why):
    path = tmp_path / "calibration.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=why) as err:
        load(path)
    assert isinstance(err.value, ValueError)
    assert str(path) in str(err.value) and "Fix: rerun `mlsys-jax plan --calibrate`" in str(err.value)


def test_the_calibrated_preset_prices_a_plan_with_the_hosts_execution(tiny_analysis):
    cal = synthetic()
    preset = cal.preset()
    assert isinstance(preset, HostPreset) and [a.name for a in preset.axes] == list(AXIS_NAMES)
    assert preset.device.peak_bf16_flops == cal.matmul_flops and preset.link_of("tensor").bandwidth == cal.bandwidth
    p = predict(tiny_analysis, hardware=preset)
    assert p.execution == Execution(0.0, 0.0, cal.dispatch_s, cal.fresh_bandwidth)
    assert p.compute_s > 0 and p.memory_s > 0 and p.comm_s > 0
    assert tiny_analysis.compiled is not None
    assert p.fresh_s == pytest.approx(tiny_analysis.compiled.temp_bytes / cal.fresh_bandwidth) and p.fresh_s > 0
    assert p.busy_s == pytest.approx(p.compute_s + p.memory_s + p.fresh_s)  # overlap 0: they add up
    assert p.serial_s == pytest.approx(p.busy_s + p.comm_s + cal.dispatch_s)
    assert cal.step_seconds(p) == pytest.approx(p.serial_s)
    # A host that gives idle devices' cores to the busy ones pays none of a pipeline's bubble;
    # an accelerator's roofline (the shipped presets, or no execution given) pays all of it.
    piped = predict(dataclasses.replace(tiny_analysis, bubble=0.25), hardware=preset)
    assert piped.serial_s == pytest.approx(p.serial_s)
    roofline = predict(tiny_analysis, hardware=preset, execution=Execution())
    assert roofline.busy_s == max(p.compute_s, p.memory_s) and roofline.fresh_s == 0
    assert predict(tiny_analysis, "cpu-8").execution == Execution()


def test_a_real_calibration_has_positive_finite_figures(measured):
    figures = (
        measured.matmul_flops,
        measured.memory_bandwidth,
        measured.fresh_bandwidth,
        measured.latency,
        measured.bandwidth,
        measured.dispatch_s,
    )
    assert all(math.isfinite(f) and f > 0 for f in figures)
    assert all(0.0 <= s <= 1.0 for s in (measured.overlap, measured.comm_overlap, measured.bubble_share))
    assert measured.devices == 8 and measured.platform == "cpu"
    kinds = {p.kind for p in measured.points if p.bench == "collective"}
    assert kinds == {"all-reduce", "all-gather", "reduce-scatter", "collective-permute"}
    assert all(p.seconds > 0 for p in measured.points if p.bench != "overlap")
    assert measured.loop_count_ratio == pytest.approx(0.25)  # XLA counts a 4-step loop body once
    assert calibration_table(measured).row_count >= 8


def test_validate_measures_a_tiny_plan(measured):
    (row,) = validate(measured, [TINY_PLAN], steps=2, warmup=1)
    assert row.plan == TINY_PLAN and len(row.step_times) == 2
    assert 0 < row.predicted_s < math.inf and 0 < row.measured_s < math.inf and math.isfinite(row.error)
    assert row.label == "data=8 b8x32"
    assert json.loads(json.dumps(row.to_json()))["measured_s"] == row.measured_s
    assert validation_table([row]).row_count == 1


def test_plan_prices_a_plan_on_a_saved_calibration_and_refuses_a_damaged_one(tmp_path, capsys):
    from mlsys_jax.cli import main

    path = synthetic().save(tmp_path / "host.json")
    assert main(["plan", "--model", "small", "--mesh", "data=8", "--seq", "128", "--calibration", str(path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "predicted on " in out and "compute " in out  # the calibrated host, not a shipped preset
    path.write_text('{"format": 1, "devices": ')  # cut short, as a full disk leaves it
    assert main(["plan", "--model", "small", "--mesh", "data=8", "--calibration", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "--calibrate" in err and err.count("\n") == 1
