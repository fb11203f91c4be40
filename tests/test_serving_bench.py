"""``bench/serving.py``: its verdict logic, its seeded Poisson workload, its percentiles and
summaries, its reading of compiled HLO, and one quick end-to-end run on a freshly initialized
tiny model (no trained checkpoint needed)."""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bench_scripts import load_bench

BENCH = load_bench("serving")
CORPUS = list(range(200)) * 5


# ---- verdicts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "published", "expected"),
    [
        (20.0, (15.0, 30.0), "within"),
        (15.0, (15.0, 30.0), "within"),  # both ends inclusive
        (30.0, (15.0, 30.0), "within"),
        (14.9, (15.0, 30.0), "below"),
        (-40.0, (15.0, 30.0), "below"),
        (31.0, (15.0, 30.0), "above"),
        (1200.0, (500.0, None), "within"),  # open upper end: "or more"
        (400.0, (500.0, None), "below"),
        (-35.0, (None, 0.0), "within"),  # "adds latency": a reduction of at most 0
        (5.0, (None, 0.0), "above"),
        (None, (15.0, 30.0), "not measured"),
        (float("nan"), (15.0, 30.0), "not measured"),
        (12.0, None, "no published figure"),
    ],
)
def test_verdict(value, published, expected):
    assert BENCH.verdict(value, published) == expected


def test_changes_are_signed_percentages():
    assert BENCH.latency_reduction_pct(2.0, 1.5) == pytest.approx(25.0)
    assert BENCH.latency_reduction_pct(1.0, 1.5) == pytest.approx(-50.0)  # slower: a negative reduction
    assert BENCH.throughput_increase_pct(100.0, 300.0) == pytest.approx(200.0)
    assert BENCH.throughput_increase_pct(100.0, 80.0) == pytest.approx(-20.0)


def test_every_published_range_is_ordered():
    for technique, pub in BENCH.PUBLISHED.items():
        for key in ("latency", "throughput"):
            rng = pub[key]
            if rng is not None and None not in rng:
                assert rng[0] <= rng[1], technique


# ---- the workload ---------------------------------------------------------------------------------------
def test_workload_is_seeded():
    a = BENCH.workload(50, 10.0, seed=3, corpus=CORPUS)
    b = BENCH.workload(50, 10.0, seed=3, corpus=CORPUS)
    c = BENCH.workload(50, 10.0, seed=4, corpus=CORPUS)
    assert a == b
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert [r.max_tokens for r in a] != [r.max_tokens for r in c]


def test_workload_statistics():
    rate, mean, n = 20.0, 32, 20000
    reqs = BENCH.workload(n, rate, seed=0, corpus=CORPUS, mean_output=mean, max_output=10**6)
    arrivals = np.array([r.arrival_s for r in reqs])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    gaps = np.diff(arrivals)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)  # Poisson process: exponential gaps
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # an exponential's CV is 1
    lengths = np.array([r.max_tokens for r in reqs])
    assert lengths.min() >= 1
    assert lengths.mean() == pytest.approx(mean, rel=0.03)
    assert np.median(lengths) == pytest.approx(mean * math.log(2), rel=0.06)  # exponential, not uniform


def test_workload_caps_prompts_and_outputs():
    reqs = BENCH.workload(500, 5.0, seed=1, corpus=CORPUS, max_output=40, prompt_tokens=(8, 24))
    assert max(r.max_tokens for r in reqs) == 40 and min(r.max_tokens for r in reqs) >= 1
    for r in reqs:
        assert 8 <= len(r.prompt) <= 24
        start = CORPUS.index(r.prompt[0])  # a contiguous slice of the corpus
        assert list(r.prompt) == CORPUS[start : start + len(r.prompt)]
    assert len({r.request_id for r in reqs}) == len(reqs)


def test_burst_arrives_at_once_and_bad_arguments_are_refused():
    assert all(r.arrival_s == 0.0 for r in BENCH.workload(10, math.inf, seed=0, corpus=CORPUS))
    with pytest.raises(ValueError):
        BENCH.workload(0, 1.0, seed=0, corpus=CORPUS)
    with pytest.raises(ValueError):
        BENCH.workload(5, 0.0, seed=0, corpus=CORPUS)
    with pytest.raises(ValueError):
        BENCH.workload(5, 1.0, seed=0, corpus=list(range(10)))


# ---- percentiles and summaries -----------------------------------------------------------------------
def test_percentile():
    assert BENCH.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert BENCH.percentile([0.0, 10.0], 99) == pytest.approx(9.9)  # linear interpolation
    assert math.isnan(BENCH.percentile([], 50))


def test_summarize():
    Record = BENCH.Record
    records = [
        Record(arrival_s=0.0, max_tokens=5, first_s=0.1, finish_s=0.5, tokens=5),  # tpot 0.1
        Record(arrival_s=1.0, max_tokens=3, first_s=1.3, finish_s=1.5, tokens=3),  # tpot 0.1
        Record(arrival_s=1.0, max_tokens=1, first_s=1.2, finish_s=1.2, tokens=1),  # one token: no tpot
        Record(arrival_s=2.0, max_tokens=4),  # never finished: left out
    ]
    s = BENCH.summarize(records, wall_s=2.0)
    assert (s["requests"], s["finished"], s["tokens"]) == (4, 3, 9)
    assert s["tokens_per_s"] == pytest.approx(4.5)
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["tpot_p50_s"] == pytest.approx(0.1) and s["tpot_p99_s"] == pytest.approx(0.1)
    assert s["latency_p50_s"] == pytest.approx(0.5)
    assert s["latency_p99_s"] == pytest.approx(0.5)


def test_slot_utilization():
    assert BENCH.slot_utilization([1, 2, 3, 4], 2) == pytest.approx(10 / 12)  # batches (1, 2) and (3, 4)
    assert BENCH.slot_utilization([5, 5, 5], 1) == 1.0  # one at a time: no slot idles
    assert BENCH.slot_utilization([1, 1, 1, 9], 4) == pytest.approx(12 / 36)


def test_median_summary():
    out = BENCH.median_summary([{"a": 1.0}, {"a": 5.0}, {"a": 2.0}])
    assert out == {"a": 2.0}


# ---- the technique table --------------------------------------------------------------------------------
def test_techniques_from_figures():
    fig = {"tokens_per_s": 100.0, "latency_p50_s": 1.0}
    results = {
        "jit": {"op_by_op": fig, "jit": {"tokens_per_s": 130.0, "latency_p50_s": 0.8}},
        "quantization": {
            "fp32": fig,
            "bf16 compute": {"tokens_per_s": 90.0, "latency_p50_s": 1.1},
            "int8 weights": {"tokens_per_s": 150.0, "latency_p50_s": 0.7},
            "int8 KV cache": {"not_measured": "no kv_cache option"},
        },
        "pallas": {"not_measured": "needs a GPU"},
        "xla_fusion": {
            "fused": {"ms_per_step": 8.0, "hlo": {"kernels": 60, "multi_op_fusions": 35}},
            "unfused": {"ms_per_step": 10.0, "hlo": {"kernels": 170, "multi_op_fusions": 1}},
            "flag_verified": True,
        },
    }
    rows = {r["technique"]: r for r in BENCH.techniques(results, {"max_output": 96})}
    jit = rows["static graph compilation (jit)"]
    assert jit["latency_reduction_pct"] == pytest.approx(20.0) and jit["latency_verdict"] == "within"
    assert jit["throughput_increase_pct"] == pytest.approx(30.0) and jit["throughput_verdict"] == "within"
    assert rows["quantization: bf16 compute"]["throughput_verdict"] == "below"
    assert rows["quantization: bf16 compute"]["why"]  # off the range: a reason is given
    assert rows["quantization: int8 weights"]["throughput_verdict"] == "within"
    kv = rows["quantization: int8 KV cache"]
    assert kv["throughput_verdict"] == "not measured" and "no kv_cache option" in kv["why"]
    assert rows["kernel fusion (Pallas paged attention)"]["latency_verdict"] == "not measured"
    fusion = rows["kernel fusion (XLA's fusion passes)"]
    assert fusion["latency_reduction_pct"] == pytest.approx(20.0)  # 10 ms -> 8 ms
    assert fusion["throughput_increase_pct"] == pytest.approx(25.0)  # steps per second: 100 -> 125
    assert rows["continuous batching"]["throughput_verdict"] == "not measured"  # batching not run


def test_unverified_fusion_flag_is_not_trusted():
    results = {"xla_fusion": {"fused": {"ms_per_step": 8.0}, "unfused": {"ms_per_step": 10.0}, "flag_verified": False}}
    rows = {r["technique"]: r for r in BENCH.techniques(results, {"max_output": 96})}
    row = rows["kernel fusion (XLA's fusion passes)"]
    assert row["latency_reduction_pct"] is None and row["latency_verdict"] == "not measured"
    assert "did not change the compiled HLO" in row["why"]


# ---- reading compiled HLO ---------------------------------------------------------------------------------
HLO = """HloModule jit_f, is_scheduled=true

%region_0.1 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_computation (param_0: f32[4], param_1: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  %param_1 = f32[4]{0} parameter(1)
  %multiply.1 = f32[4]{0} multiply(%param_0, %param_1)
  ROOT %tanh.0 = f32[4]{0} tanh(%multiply.1)
}

%wrapped_exp_computation (param_0.2: f32[4]) -> f32[4] {
  %param_0.2 = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%param_0.2)
}

ENTRY %main.4 (x.1: f32[4], w.1: f32[4]) -> (f32[], f32[4]) {
  %x.1 = f32[4]{0} parameter(0)
  %w.1 = f32[4]{0} parameter(1)
  %constant.0 = f32[] constant(0)
  %mul_tanh_fusion = f32[4]{0} fusion(%x.1, %w.1), kind=kLoop, calls=%fused_computation
  %wrapped_exp = f32[4]{0} fusion(%mul_tanh_fusion), kind=kLoop, calls=%wrapped_exp_computation
  %reduce.0 = f32[] reduce(%wrapped_exp, %constant.0), dimensions={0}, to_apply=%region_0.1
  ROOT %tuple.0 = (f32[], f32[4]{0}) tuple(%reduce.0, %wrapped_exp)
}
"""


def test_fusion_stats_of_hand_written_hlo():
    assert BENCH.fusion_stats(HLO) == {"fusions": 2, "multi_op_fusions": 1, "fused_ops": 2, "kernels": 3}


def test_fusion_stats_of_compiled_hlo():
    def f(x):
        return jnp.sum(jnp.tanh(x * 2.0 + 1.0) * x)

    text = jax.jit(f).lower(jnp.ones((64, 64))).compile().as_text() or ""
    stats = BENCH.fusion_stats(text)
    assert stats["fusions"] >= 1 and stats["multi_op_fusions"] >= 1 and stats["kernels"] >= 1


def test_decode_step_probe_on_a_tiny_engine():
    engine = BENCH.random_factory("tiny", prefill_chunk=16)(scheduler="continuous", max_seqs=4, num_blocks=64)
    tokens, positions, slots, tables, lengths, last = BENCH.decode_inputs(engine, 40)
    assert tokens.shape == (4, 1) and tables.shape == (4, engine.max_blocks)
    assert len({int(b) for b in tables[:, :3].reshape(-1)}) == 12  # every row has blocks of its own
    assert list(lengths) == [40] * 4 and list(positions[:, 0]) == [39] * 4 and not last.any()
    assert list(slots[:, 0]) == [int(tables[r, 39 // 16]) * 16 + 39 % 16 for r in range(4)]  # position 39's slot
    probe = BENCH.decode_step_probe(engine, length=40, steps=3, rounds=2, ops=True)
    assert probe["ms_per_step"] > 0 and len(probe["ms_per_step_rounds"]) == 2
    assert probe["hlo"]["kernels"] > 0 and probe["ops"].get("dot:f32", 0) > 0
    assert probe["param_bytes"] > 0 and probe["pool_sized_copies"] >= 0


# ---- the command ---------------------------------------------------------------------------------------
def test_no_checkpoint_says_make_demo(tmp_path, capsys):
    assert BENCH.main(["--ckpt-dir", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and "Traceback" not in err
    assert not (tmp_path / "serving.json").exists()


def test_quick_batching_run_end_to_end(tmp_path):
    """Every scheduler serves the same Poisson stream on a fresh ``llama:tiny``: each request
    finishes with exactly its drawn number of tokens and nothing compiles while timed."""
    code = BENCH.main(["--quick", "--random-model", "tiny", "--only", "batching,pallas", "--out", str(tmp_path)])
    assert code == 0
    doc = json.loads((tmp_path / "serving.json").read_text())
    assert doc["settings"]["quick"] and doc["jax"] == jax.__version__
    rows = doc["batching"]
    assert {r["label"] for r in rows} == set(BENCH.SCHEDULERS)
    wanted = BENCH.workload(
        doc["settings"]["requests_per_rate"],
        doc["settings"]["rates_per_s"][0],
        seed=doc["settings"]["seed"],
        corpus=list(range(256)) * 20,
        max_output=doc["settings"]["max_output"],
    )
    for r in rows:
        assert r["finished"] == r["requests"] == doc["settings"]["requests_per_rate"]
        assert r["tokens"] == sum(w.max_tokens for w in wanted)  # EOS did not cut any request short
        assert r["programs_compiled_while_timed"] == 0
        assert r["tokens_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0
    verdicts = {t["technique"]: t for t in doc["techniques"]}
    assert verdicts["continuous batching"]["throughput_verdict"] in ("within", "above", "below")
    assert verdicts["kernel fusion (Pallas paged attention)"]["throughput_verdict"] == "not measured"
    assert verdicts["static graph compilation (jit)"]["why"] == "not measured: not run (--only)"
    assert (tmp_path / "serving-cpu.png").stat().st_size > 10_000


def test_the_runs_precision_reaches_every_engine_but_the_quantization_rows_own_choices():
    args = argparse.Namespace(random_model="tiny", quick=True, dtype="bfloat16", weights="int8", kv_cache="int8")
    make = BENCH.factory_for(args)
    engine = make(scheduler="continuous", max_seqs=2, num_blocks=16)
    assert engine.config.kv_cache == "int8" and engine.model.config.dtype == "bfloat16"
    assert "int8" in str(jax.tree_util.tree_leaves(engine.params["layers"]["wq"])[0].dtype)
    assert make(**BENCH.QUANT_VARIANTS["fp32"], max_seqs=2, num_blocks=16).config.kv_cache == "auto"
    assert BENCH.precision(args) == "bf16, int8 weights, int8 KV cache"
    assert BENCH.source_args(args)[-6:] == ["--dtype", "bfloat16", "--weights", "int8", "--kv-cache", "int8"]
