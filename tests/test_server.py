"""The OpenAI-compatible server over the engine runner, spoken to by the official ``openai``
client (and raw HTTP where the client cannot say it): streamed and whole answers agree, usage
adds up, every bad input is a 400 naming its field, a full queue is a 429 with Retry-After, a
client that leaves mid-answer frees its engine slot, metrics count what happened, and draining
lets running requests finish while refusing new ones. A deterministic fake engine
(``fake_engine.py``) stands in for the model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

from mlsys_jax.serve.runner import EngineRunner
from mlsys_jax.serve.server import create_app
from mlsys_jax.tokenizer import ByteTokenizer, render_chat

MODEL = "fake-reverser"
ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Served:
    url: str
    engine: FakeEngine
    runner: EngineRunner

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=20)

    def post(self, path: str, body: object, **kwargs: object) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=20, **kwargs)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def serving(engine: FakeEngine, max_queue: int = 64) -> Iterator[Served]:
    """The app on uvicorn in a background thread, on a free local port; always shut down."""
    runner = EngineRunner(engine, max_queue)
    app = create_app(runner, model_id=MODEL)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, runner)
    finally:
        engine.resume()
        server.should_exit = True
        thread.join(timeout=10)
        runner.stop()
        sock.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with serving(FakeEngine(context_limit=512, max_seqs=8)) as s:
        yield s


def reversed_text(prompt: str) -> str:
    return prompt[::-1]


def test_streamed_and_whole_completions_agree(served: Served):
    client = served.client()
    prompt = "héllo wörld ✓ 日本"  # multi-byte characters arrive over several tokens
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
    assert whole.choices[0].text == reversed_text(prompt)
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "text_completion" for c in chunks)
    # Seeded sampling: the same draws streamed or whole.
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0.9, seed=7)
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=64, temperature=0.9, seed=7, stream=True
    )
    again, streamed = again.choices[0].text, "".join(c.choices[0].text for c in streamed)
    assert again == streamed and sorted(again) == sorted(prompt) and again != reversed_text(prompt)


def test_usage_counts_prompt_and_completion_tokens(served: Served):
    client = served.client()
    prompt = "abcdefghij✓"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == reversed_text(prompt)[:3]  # ✓ (3 bytes), then j and i
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt.encode()), 5)
    assert out.usage.total_tokens == len(prompt.encode()) + 5
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == out.usage


def test_chat_completion_streamed_and_whole(served: Served):
    client = served.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    expected = render_chat(ByteTokenizer(), messages)[::-1]
    out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)  # type: ignore[arg-type]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.prompt_tokens == len(render_chat(ByteTokenizer(), messages).encode())
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
            max_completion_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_stop_strings_and_logprobs(served: Served):
    client = served.client()
    out = client.completions.create(model=MODEL, prompt="abcdef", stop=["cb", "zz"], temperature=0, logprobs=2)
    assert out.choices[0].text == "fed" and out.choices[0].finish_reason == "stop"
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert logprobs.tokens[:3] == ["f", "e", "d"] and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert logprobs.text_offset is not None and logprobs.text_offset[:3] == [0, 1, 2]
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "é"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=1,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert content[0].token == " " and content[0].bytes == [32] and len(content[0].top_logprobs) == 1


def test_models_and_health(served: Served):
    client = served.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{served.url}/health").status_code == 200
    missing = httpx.get(f"{served.url}/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


BAD_COMPLETIONS = [
    ({"prompt": "x" * 600}, "prompt", "600 tokens"),
    ({"prompt": "hi", "foo": 1, "bar": 2}, "foo", "unknown fields 'foo', 'bar'"),
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "positive integer"),
    ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens", "does not fit"),
    ({"prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "temperature must be between"),
    ({"prompt": "hi", "temperature": 1e9}, "temperature", "temperature must be between"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "top_p must be in"),
    ({"prompt": "hi", "top_p": 2}, "top_p", "top_p must be in"),
    ({"prompt": "hi", "n": 2}, "n", "n must be 1"),
    ({"prompt": "hi", "echo": True}, "echo", "not supported"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": 5}, "prompt", "a string, a list of one string, or a list of token ids"),
    ({"prompt": [1, 9999]}, "prompt", "outside the vocabulary"),
    ({"max_tokens": 3}, "prompt", "missing field 'prompt'"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs", "logprobs must be between"),
]


@pytest.mark.parametrize(("body", "param", "says"), BAD_COMPLETIONS, ids=[c[2] for c in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400_naming_the_field(served: Served, body, param, says):
    response = served.post("/v1/completions", {"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"], error["message"]


def test_bad_bodies_and_chat_requests_are_400(served: Served):
    invalid_utf8 = b'{"model": "fake-reverser", "prompt": "caf\xe9"}'
    cases = [
        ("/v1/completions", invalid_utf8, "not valid UTF-8"),
        ("/v1/completions", b'{"prompt": "hi",', "not valid JSON"),
        ("/v1/completions", b"[1, 2]", "must be a JSON object"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "'messages.0.role'"),
        ("/v1/chat/completions", {"messages": []}, "at least one message"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]}, "context limit is 512"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "logprobs: true",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ]
    for path, body, says in cases:
        response = served.post(path, body)
        assert response.status_code == 400, (says, response.text)
        assert says in response.json()["error"]["message"], (says, response.json())
    # The client raises its own error type on them.
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        served.client().completions.create(model=MODEL, prompt="hi", n=2)


def test_unknown_model_is_404_naming_the_served_one(served: Served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client().completions.create(model="gpt-5", prompt="hi")
    assert caught.value.status_code == 404
    error = caught.value.response.json()["error"]
    assert error["code"] == "model_not_found" and MODEL in error["message"]


def test_fifty_concurrent_requests_are_all_answered(served: Served):
    prompts = [f"request number {i} ✓" for i in range(50)]

    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=30)
        try:

            async def ask(i: int, prompt: str) -> str:
                if i % 2:
                    out = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
                    return out.choices[0].text
                stream = await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.wait_for(asyncio.gather(*(ask(i, p) for i, p in enumerate(prompts))), timeout=60)
        finally:
            await client.close()

    assert asyncio.run(ask_all()) == [reversed_text(p) for p in prompts]
    wait_until(lambda: served.runner.stats()["in_flight"] == 0, what="every request to finish")


def test_client_leaving_mid_stream_aborts_its_request(served: Served):
    engine = served.engine
    engine.step_delay = 0.01
    try:
        body = {"model": MODEL, "prompt": "y" * 200, "max_tokens": 250, "stream": True}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=20) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            request_id = json.loads(first.removeprefix("data: "))["id"]
            next(lines)
        wait_until(lambda: request_id in engine.aborted, timeout=5, what="the runner to abort the request")
        wait_until(lambda: not engine.running and served.runner.stats()["in_flight"] == 0, what="the slot to free")
        # A whole (non-streamed) answer whose client gives up is aborted too.
        before = len(engine.aborted)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.url}/v1/completions", json={**body, "stream": False}, timeout=0.3)
        wait_until(lambda: len(engine.aborted) > before, timeout=5, what="the whole answer's abort")
        wait_until(lambda: not engine.running and served.runner.stats()["in_flight"] == 0, what="the slot to free")
    finally:
        engine.step_delay = 0.0


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_gauges_histograms_and_outcomes(served: Served):
    client = served.client()
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=4, temperature=0)
    served.post("/v1/completions", {"prompt": "hi", "top_p": 0})
    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = metric_values(response.text)
    for gauge in ("requests_waiting", "requests_running", "kv_blocks_used", "programs_compiled"):
        assert (f"mlsys_jax_{gauge}", ()) in values, gauge
    assert values[("mlsys_jax_kv_blocks_capacity", ())] == 256
    assert values[("mlsys_jax_programs_compiled", ())] == 2
    assert values[("mlsys_jax_generation_tokens_total", ())] >= 4
    assert values[("mlsys_jax_generation_tokens_per_second", ())] > 0
    assert values[("mlsys_jax_time_to_first_token_seconds_count", ())] >= 1
    assert values[("mlsys_jax_time_per_output_token_seconds_count", ())] >= 1
    assert values[("mlsys_jax_requests_total", (("outcome", "finished"),))] >= 1
    assert values[("mlsys_jax_requests_total", (("outcome", "bad_request_400"),))] >= 1
    assert ("mlsys_jax_requests_total", (("outcome", "rejected_429"),)) in values


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, list[str]]:
    """Post a streamed completion from a thread; the list gets its data lines."""
    lines: list[str] = []

    def run() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as response:
            lines.append(f"status {response.status_code}")
            lines.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, lines


def streamed_text(lines: list[str]) -> str:
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))


def test_full_queue_is_429_with_retry_after():
    engine = FakeEngine(max_seqs=1)
    with serving(engine, max_queue=2) as s:
        engine.pause()
        threads = [stream_in_thread(s.url, {"prompt": f"queued {i}", "max_tokens": 4}) for i in range(2)]
        wait_until(lambda: s.runner.stats()["queued"] >= 2, what="two queued requests")
        refused = s.post("/v1/completions", {"prompt": "one too many"})
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model=MODEL, prompt="and another")
        engine.resume()
        for thread, lines in threads:
            thread.join(timeout=10)
            assert lines[0] == "status 200" and lines[-1] == "data: [DONE]"
        assert s.post("/v1/completions", {"prompt": "room again", "max_tokens": 2}).status_code == 200


def test_draining_refuses_new_requests_and_finishes_running_ones():
    engine = FakeEngine()
    with serving(engine) as s:
        engine.pause()
        thread, lines = stream_in_thread(s.url, {"prompt": "in flight ✓", "max_tokens": 50, "temperature": 0})
        wait_until(lambda: engine.added and engine.in_step.is_set(), what="the request to be running")
        cut: list[int] = []
        drainer = threading.Thread(target=lambda: cut.append(s.runner.drain(10.0)), daemon=True)
        drainer.start()
        wait_until(lambda: s.runner.draining, what="draining")
        refused = s.post("/v1/completions", {"prompt": "too late"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_draining"
        assert httpx.get(f"{s.url}/health").status_code == 503
        engine.resume()
        thread.join(timeout=10)
        drainer.join(timeout=10)
        assert lines[0] == "status 200" and lines[-1] == "data: [DONE]"
        assert streamed_text(lines) == reversed_text("in flight ✓")
        assert cut == [0] and not engine.aborted


def test_drain_deadline_aborts_what_is_left():
    engine = FakeEngine()
    with serving(engine) as s:
        engine.pause()
        thread, lines = stream_in_thread(s.url, {"prompt": "never finishes", "max_tokens": 50})
        wait_until(lambda: engine.added and engine.in_step.is_set(), what="the request to be running")
        threading.Timer(0.4, engine.resume).start()  # the step in progress ends, then the abort is applied
        assert s.runner.drain(0.2) == 1
        thread.join(timeout=10)
        assert engine.aborted == engine.added
        error = json.loads(lines[-1].removeprefix("data: "))["error"]
        assert error["code"] == "server_draining" and "shutting down" in error["message"]


SERVE_SCRIPT = """
import sys, types
sys.path.insert(0, "tests")
from fake_engine import FakeEngine

def engine_for(cfg):
    engine = FakeEngine(block_size=cfg.block_size, num_blocks=cfg.num_blocks)
    engine.step_delay = 0.02
    return engine

sys.modules["mlsys_jax.serve.loading"] = types.SimpleNamespace(engine_for=engine_for)
from mlsys_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_drains_on_sigterm_and_exits_zero(tmp_path):
    port = free_port()
    args = ["serve", "--ckpt-dir", str(tmp_path), "--port", str(port), "--num-blocks", "64", "--drain-seconds", "20"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == (
            f"serving fake-reverser on http://127.0.0.1:{port} (scheduler continuous, float32 compute, "
            "weights as trained, 64 float32 KV blocks of 16 tokens)"
        )
        url = f"http://127.0.0.1:{port}"
        thread, lines = stream_in_thread(url, {"prompt": "z" * 60 + "✓", "max_tokens": 100, "temperature": 0})
        wait_until(lambda: len(lines) > 2, what="the first tokens")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, what="the server to drain")  # still listening
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "late"}).status_code == 503
        thread.join(timeout=20)
        assert lines[-1] == "data: [DONE]" and streamed_text(lines) == "✓" + "z" * 60
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class BrokenEngine(FakeEngine):
    """Raises in its third step, as an engine whose accelerator failed would."""

    def step(self):
        if self.steps == 2:
            raise RuntimeError("device lost")
        return super().step()


def test_an_engine_failure_fails_requests_instead_of_hanging():
    with serving(BrokenEngine()) as s:
        with pytest.raises(openai.InternalServerError, match="device lost"):
            s.client().completions.create(model=MODEL, prompt="doomed", max_tokens=10)
        assert httpx.get(f"{s.url}/health").status_code == 503
        with pytest.raises(openai.InternalServerError, match="serves no more requests"):
            s.client().completions.create(model=MODEL, prompt="after", max_tokens=10)


def test_an_idle_runner_does_not_step(served: Served):
    served.client().completions.create(model=MODEL, prompt="one", max_tokens=2)
    wait_until(lambda: served.runner.stats()["in_flight"] == 0, what="the request to finish")
    steps = served.engine.steps
    time.sleep(0.2)
    assert served.engine.steps == steps
