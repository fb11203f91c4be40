"""The serving engine as a specification: every generated position's logits equal the no-cache
forward's, a seeded request's output does not depend on its batch, long prompts are prefilled
in chunks beside decoding, a full cache preempts instead of crashing, the three schedulers admit
as they say, and the cache's blocks all come back."""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.models import base, get_config, llama
from mlsys_jax.serve.engine import Engine, EngineConfig
from mlsys_jax.serve.kv_blocks import BlockAllocator
from mlsys_jax.serve.requests import RequestError, SamplingParams
from mlsys_jax.serve.text import TextStream
from mlsys_jax.tokenizer import ByteTokenizer

CFG = get_config("tiny", dtype="float32")
MODEL = llama.language_model(CFG)
CONTEXT = 128


@pytest.fixture(scope="module")
def plan(devices):
    return mj.Plan(mj.make_mesh(tensor=2, devices=devices[:2]), mj.rules("tp"))


@pytest.fixture(scope="module")
def params(plan):
    return plan.init(MODEL.specs, jax.random.key(0))


@pytest.fixture(scope="module")
def reference(params):
    fwd = jax.jit(lambda p, t: base.forward(MODEL, p, t))
    return lambda tokens: np.asarray(fwd(params, np.asarray(tokens, np.int32)[None]))[0]


@pytest.fixture
def make(plan, params):
    made: list[Engine] = []

    def build(**config):
        engine = Engine(
            MODEL,
            plan,
            params,
            ByteTokenizer(),
            context_limit=CONTEXT,
            config=EngineConfig(**config),
            record_logits=True,
        )
        made.append(engine)
        return engine

    yield build
    for engine in made:  # every test leaves the cache empty
        assert not engine.has_work() and engine.allocator.used == 0


def drain(engine, limit=500):
    outputs = {}
    for _ in range(limit):
        if not engine.has_work():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("the engine did not finish within the step limit")


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


MIXED = [(5, 20), (40, 8), (1, 30), (70, 12), (17, 25), (3, 5), (33, 16), (2, 40)]


def test_every_generated_position_has_the_no_cache_forward_logits(make, reference):
    engine = make(max_seqs=4, block_size=16, num_blocks=24, prefill_chunk=32)
    for i, (prompt, (_, max_tokens)) in enumerate(zip(prompts([n for n, _ in MIXED]), MIXED)):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    seqs = list(engine.waiting)
    outputs = drain(engine)
    compared = 0
    for seq in seqs:
        ref = reference(seq.prompt + seq.generated)
        assert len(seq.logits) == len(seq.generated) >= 1
        for j, logits in enumerate(seq.logits):
            expected = ref[len(seq.prompt) - 1 + j]
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
            top2 = np.sort(expected)[-2:]
            if top2[1] - top2[0] > 1e-3:
                assert seq.generated[j] == int(np.argmax(expected))
            compared += 1
        assert [t for o in outputs[seq.request_id] for t in o.token_ids] == seq.generated
    assert compared == sum(len(s.generated) for s in seqs) > 100


def test_a_seeded_request_gives_the_same_output_alone_or_among_fifteen_others(make):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_k=40, top_p=0.9, seed=1234)
    alone = make(max_seqs=16, num_blocks=64)
    alone.add_request("me", prompts([9])[0], params)
    mine = [t for o in drain(alone)["me"] for t in o.token_ids]

    crowd = make(max_seqs=16, num_blocks=64)
    others = prompts([3 + 5 * i for i in range(15)], seed=1)
    for i, p in enumerate(others[:7]):
        crowd.add_request(f"o{i}", p, SamplingParams(max_tokens=10 + i, temperature=1.0, seed=i))
    crowd.add_request("me", prompts([9])[0], params)
    for i, p in enumerate(others[7:], 7):
        crowd.add_request(f"o{i}", p, SamplingParams(max_tokens=10 + i, temperature=0.7, top_p=0.5, seed=i))
    assert [t for o in drain(crowd)["me"] for t in o.token_ids] == mine
    assert len(set(mine)) > 3  # really sampled, not a constant


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding(make):
    engine = make(max_seqs=4, block_size=16, num_blocks=32, prefill_chunk=16)
    engine.add_request("short", prompts([4])[0], SamplingParams(max_tokens=40, temperature=0.0))
    engine.step()
    engine.step()  # "short" is decoding now
    engine.add_request("long", prompts([100], seed=3)[0], SamplingParams(max_tokens=4, temperature=0.0))
    gaps = []
    while "long" in [s.request_id for s in engine.running.values()] or engine.waiting:
        produced = {o.request_id for o in engine.step()}
        long_seq = next((s for s in engine.running.values() if s.request_id == "long"), None)
        if long_seq is not None and long_seq.pending > 1:
            gaps.append("short" in produced)
    drain(engine)
    assert len(gaps) >= 5 and all(gaps)  # a token for "short" in every step of the long prefill


def test_a_full_cache_preempts_and_recomputes_instead_of_crashing(make, reference):
    roomy = make(max_seqs=4, num_blocks=64)
    tight = make(max_seqs=4, num_blocks=6, block_size=16)  # 5 usable blocks: 80 tokens for 4 sequences
    for engine in (roomy, tight):
        for i, p in enumerate(prompts([20, 30, 10, 25], seed=5)):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.0))
    seqs = list(tight.waiting)
    a, b = drain(roomy), drain(tight)
    assert tight.preemptions > 0 and roomy.preemptions == 0
    for rid in a:
        assert [t for o in a[rid] for t in o.token_ids] == [t for o in b[rid] for t in o.token_ids]
    for seq in seqs:  # recomputed positions still carry the forward's logits
        ref = reference(seq.prompt + seq.generated)
        np.testing.assert_allclose(seq.logits[-1], ref[len(seq.tokens) - 2], atol=1e-5)


def test_programs_are_bounded_whatever_the_prompt_lengths(make):
    engine = make(max_seqs=4, num_blocks=64, prefill_chunk=64)
    for i, p in enumerate(prompts([1, 2, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100], seed=7)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=3, temperature=0.0))
    drain(engine)
    assert engine.program_bound == 1 + 3 + 2  # decode; prefill at 16, 32 and 64; two samplers
    assert engine.programs_compiled == engine.program_bound


def test_static_batching_waits_for_a_full_batch_and_dynamic_for_its_timeout(make):
    static = make(max_seqs=3, num_blocks=32, scheduler="static")
    for i in range(2):
        static.add_request(f"s{i}", [65 + i], SamplingParams(max_tokens=2, temperature=0.0))
    assert static.step() == [] and not static.running
    static.add_request("s2", [67], SamplingParams(max_tokens=2, temperature=0.0))
    assert len(static.step()) == 3 and len(static.running) == 3  # the full batch starts at once
    static.add_request("late", [68], SamplingParams(max_tokens=2, temperature=0.0))
    while static.running:
        static.step()
        assert "late" not in [s.request_id for s in static.running.values()]  # no joining a running batch
    static.abort("late")

    dynamic = make(max_seqs=8, num_blocks=32, scheduler="dynamic", batch_timeout_s=0.2)
    dynamic.add_request("d0", [65], SamplingParams(max_tokens=2, temperature=0.0))
    assert dynamic.step() == []  # waits for others ...
    time.sleep(0.25)
    dynamic.step()
    assert dynamic.running  # ... until the first has waited its timeout
    drain(dynamic)


def test_sampling_filters_and_logprobs(make):
    engine = make(max_seqs=4, num_blocks=32)
    p = prompts([12], seed=9)[0]
    engine.add_request("greedy", p, SamplingParams(max_tokens=12, temperature=0.0, logprobs=3))
    engine.add_request("top1", p, SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=5))
    engine.add_request("nucleus", p, SamplingParams(max_tokens=12, temperature=2.0, top_p=1e-6, seed=6))
    seqs = {s.request_id: s for s in engine.waiting}
    out = drain(engine)
    greedy = [t for o in out["greedy"] for t in o.token_ids]
    assert [t for o in out["top1"] for t in o.token_ids] == greedy
    assert [t for o in out["nucleus"] for t in o.token_ids] == greedy
    for o, logits in zip(out["greedy"], seqs["greedy"].logits):
        (lp,) = o.logprobs
        log_probs = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        assert lp.logprob == pytest.approx(float(log_probs[lp.token_id]), abs=1e-5)
        assert len(lp.top) == 3 and max(lp.top.values()) == pytest.approx(float(log_probs.max()), abs=1e-5)


def test_requests_that_cannot_be_served_are_refused_by_name(make):
    engine = make(max_seqs=2, num_blocks=4, block_size=16)
    cases = [
        ([1] * CONTEXT, SamplingParams(), "the prompt has 128 tokens; the model's context is 128"),
        ([1] * 100, SamplingParams(max_tokens=29), "max_tokens=29 does not fit: the prompt leaves 28"),
        ([1] * 40, SamplingParams(max_tokens=20), "need 4 KV-cache blocks; the cache holds 3"),
        ([1], SamplingParams(temperature=-1.0), "temperature must be between 0 and 100"),
        ([1], SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
        ([1], SamplingParams(max_tokens=0), "max_tokens must be a positive integer"),
        ([], SamplingParams(), "the prompt is empty"),
        ([999], SamplingParams(), r"token ids outside the vocabulary \[0, 384\)"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.add_request("x", prompt, params)
    assert not engine.has_work()


def test_an_aborted_request_gives_its_blocks_back_at_once(make):
    engine = make(max_seqs=2, num_blocks=16)
    engine.add_request("a", prompts([40])[0], SamplingParams(max_tokens=50, temperature=0.0))
    for _ in range(4):
        engine.step()
    assert engine.allocator.used > 0
    engine.abort("a")
    assert engine.allocator.used == 0 and not engine.has_work()


def test_the_context_limit_ends_a_request_with_length(make):
    engine = make(max_seqs=2, num_blocks=16)
    engine.add_request("edge", [1] * (CONTEXT - 3), SamplingParams(max_tokens=3, temperature=0.0))
    (last, *_) = reversed(drain(engine)["edge"])
    assert last.finish_reason == "length" and last.completion_tokens == 3


def test_text_streams_in_whole_characters_and_stops_before_a_stop_string():
    tok = ByteTokenizer()
    stream = TextStream(tok, stop=("END",))
    pieces = []
    for b in "café EN".encode() + b"D tail":
        delta, stopped = stream.add(b)
        pieces.append(delta)
        if stopped:
            break
    assert stopped and "".join(pieces) == "café "
    assert all("\ufffd" not in p for p in pieces)  # the two bytes of é came out as one character
    assert pieces[3] == "" and pieces[4] == "é"

    plain = TextStream(tok)
    text = "".join(plain.add(b)[0] for b in "日本".encode()) + plain.finish()
    assert text == "日本"


def test_the_allocator_hands_out_each_block_once():
    blocks = BlockAllocator(5)
    got = blocks.allocate(3)
    assert got is not None and 0 not in got and len(set(got)) == 3
    assert blocks.allocate(2) is None and blocks.used == 3  # all or nothing
    blocks.release(got)
    with pytest.raises(ValueError, match="is not in use"):
        blocks.release(got[:1])
    assert blocks.used == 0


def test_data_parallel_replicas_share_the_requests_and_answer_as_one_engine(make, plan, params, devices):
    from mlsys_jax.serve.loading import replica_plans
    from mlsys_jax.serve.replicas import Replicas

    plans = replica_plans("data=2,tensor=2")
    assert [sorted(d.id for d in p.replicated().device_set) for p in plans] == [[0, 1], [2, 3]]
    engines = [
        Engine(MODEL, p, jax.device_put(params, p.param_shardings(MODEL.specs)), ByteTokenizer(), context_limit=CONTEXT)
        for p in plans
    ]
    replicas, single = Replicas(engines), make(max_seqs=16, num_blocks=64)
    for target in (replicas, single):
        for i, p in enumerate(prompts([3, 9, 14, 5, 21, 2], seed=11)):
            target.add_request(f"r{i}", p, SamplingParams(max_tokens=10, temperature=0.0))
    assert [len(e.waiting) for e in engines] == [3, 3]  # the least loaded takes each
    a, b = drain(replicas), drain(single)
    assert {k: [t for o in v for t in o.token_ids] for k, v in a.items()} == {
        k: [t for o in v for t in o.token_ids] for k, v in b.items()
    }
    assert replicas.stats()["kv_blocks_used"] == 0 and not replicas.owner


@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
def test_the_pallas_paged_kernel_serves_the_same_logits_as_xla_per_shard_of_heads(plan, params, kv_cache):
    """Under tensor parallelism the Pallas kernel (interpreted here) runs per shard of heads."""
    logits = {}
    for impl in ("xla", "pallas"):
        model = llama.language_model(CFG.replace(paged_attention_impl=impl))
        engine = Engine(
            model,
            plan,
            params,
            ByteTokenizer(),
            context_limit=64,
            config=EngineConfig(max_seqs=2, num_blocks=16, prefill_chunk=16, kv_cache=kv_cache),
            record_logits=True,
        )
        for i, p in enumerate(prompts([5, 20], seed=9)):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0.0))
        seqs = list(engine.waiting)
        drain(engine)
        assert engine.allocator.used == 0
        logits[impl] = np.stack([x for s in seqs for x in s.logits])
    assert logits["xla"].shape == (8, MODEL.vocab_size)
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("max_seqs", [1, 4])
@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
def test_a_decode_step_writes_the_pools_in_place_without_copying_them(plan, params, kv_cache, max_seqs):
    """Its cost must not grow with the pool: no buffer the size of a layer's pool (or more) is
    copied or filled per step, in any of the shapes the pools take inside the program."""
    config = EngineConfig(max_seqs=max_seqs, kv_cache=kv_cache)
    engine = Engine(MODEL, plan, params, ByteTokenizer(), context_limit=CONTEXT, config=config)
    rows, width = engine.config.max_seqs, engine.max_blocks
    ints = lambda *shape: np.zeros(shape, np.int32)
    args = (ints(rows, 1), ints(rows, 1), ints(rows, 1), ints(rows, width), np.ones((rows,), np.int32), ints(rows))
    hlo = engine._forward.lower(engine.params, engine.k_pages, engine.v_pages, *args).compile().as_text() or ""
    pool = jax.tree_util.tree_leaves(engine.k_pages)[0]
    layer_pool = pool.size // pool.shape[0] // 2  # one layer's pool on each of the 2 devices
    big = []
    for line in hlo.splitlines():
        found = re.search(r"= [a-z0-9]+\[([0-9,]*)\]\S* (copy|broadcast)\(", line)
        if found and math.prod(int(d) for d in found.group(1).split(",") if d) >= layer_pool:
            big.append(line.strip()[:160])
    assert not big, big[:3]


def test_ignore_eos_generates_past_the_end_of_sequence_token_up_to_max_tokens(make):
    probe = make(max_seqs=2, num_blocks=16)
    probe.add_request("probe", prompts([6])[0], SamplingParams(max_tokens=1, temperature=0.0))
    first = drain(probe)["probe"][0].token_ids[0]  # the greedy first token: made the EOS below

    class EndsAtFirst(ByteTokenizer):
        EOS = first

    finished = {}
    for ignore in (False, True):
        engine = make(max_seqs=2, num_blocks=16)
        engine.tokenizer = EndsAtFirst()
        engine.add_request("r", prompts([6])[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=ignore))
        outs = drain(engine)["r"]
        finished[ignore] = (sum(len(o.token_ids) for o in outs), outs[-1].finish_reason)
    assert finished == {False: (1, "stop"), True: (12, "length")}
