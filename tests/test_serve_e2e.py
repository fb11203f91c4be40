"""``mlsys-jax serve`` on a checkpoint trained here, spoken to by the official ``openai`` client
over localhost: the real engine behind the real command, with every answer, refusal and the KV
cache's blocks checked."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from recipe_runs import CORPUS, env, run
from test_multihost import free_port

from mlsys_jax.models import get_config
from mlsys_jax.tokenizer import ByteTokenizer, render_chat

CONTEXT = 96  # the run's --seq: the served model's context


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_run")
    flags = ["--model", "tiny", "--steps", "10", "--batch", "16", "--seq", str(CONTEXT), "--sample-tokens", "0"]
    out = run(*flags, "--no-progress", "--data", CORPUS, "--eval-batches", "1", "--ckpt-dir", str(folder))
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


@contextlib.contextmanager
def serving(checkpoint, *extra: str) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "mlsys_jax.cli", "serve", "--ckpt-dir", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen([*command, *extra], env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def gauge(url: str, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == name and labels.items() <= s.labels.items())


QUANTIZED = ("--weights", "int8", "--kv-cache", "int8")


@pytest.fixture(scope="module", params=[(), QUANTIZED], ids=["as-trained", "int8-weights-and-kv"])
def variant(request) -> tuple[str, ...]:
    """The server as trained, and with int8 weights and an int8 KV cache: both must behave alike."""
    return request.param


@pytest.fixture(scope="module")
def served(checkpoint, variant):
    with serving(checkpoint, "--max-seqs", "8", "--num-blocks", "96", "--model-name", "tiny", *variant) as url:
        yield url


@pytest.mark.slow
def test_streamed_and_whole_completions_agree_at_temperature_zero(served):
    c = client(served)
    whole = c.completions.create(model="tiny", prompt="def main(", max_tokens=20, temperature=0)
    pieces = c.completions.create(model="tiny", prompt="def main(", max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in pieces) == whole.choices[0].text
    assert whole.usage is not None and whole.usage.prompt_tokens == len(b"def main(")
    assert whole.usage.completion_tokens == 20 or whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


@pytest.mark.slow
def test_ignore_eos_is_taken_as_vllm_takes_it(served):
    out = client(served).completions.create(
        model="tiny", prompt="x = ", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].finish_reason == "length" and out.usage is not None and out.usage.completion_tokens == 30


@pytest.mark.slow
def test_a_chat_completion_uses_the_plain_template_of_the_byte_tokenizer(served):
    messages = [{"role": "user", "content": "hello"}]
    answer = client(served).chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)  # pyright: ignore[reportArgumentType]
    assert answer.choices[0].message.role == "assistant" and answer.usage is not None
    assert answer.usage.prompt_tokens == len(render_chat(ByteTokenizer(), messages).encode())


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, says",
    [
        ({"prompt": "x" * (CONTEXT + 10)}, f"context limit is {CONTEXT} tokens"),
        ({"prompt": "hi", "frequency": 1}, "frequency"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 2}, "top_p"),
    ],
)
def test_bad_requests_are_400_in_openais_shape(served, body, says):
    reply = httpx.post(f"{served}/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"]


@pytest.mark.slow
def test_invalid_utf8_is_400(served):
    reply = httpx.post(
        f"{served}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 400 and "UTF-8" in reply.json()["error"]["message"]


@pytest.mark.slow
def test_fifty_concurrent_requests_are_all_answered_and_the_cache_empties(served):
    c = client(served)

    def ask(i: int) -> str:
        return (
            c.completions.create(model="tiny", prompt=f"import {i}", max_tokens=8 + i % 9, seed=i)
            .choices[0]
            .finish_reason
        )

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        reasons = list(pool.map(ask, range(50)))
    assert len(reasons) == 50 and set(reasons) <= {"stop", "length"}
    deadline = time.time() + 10
    while gauge(served, "mlsys_jax_kv_blocks_used") and time.time() < deadline:
        time.sleep(0.1)
    assert gauge(served, "mlsys_jax_kv_blocks_used") == 0


@pytest.mark.slow
def test_the_kv_cache_takes_the_bytes_of_its_kind(served, variant):
    tiny = get_config("tiny")
    slots = tiny.n_layers * 96 * 16 * tiny.n_kv_heads  # --num-blocks 96 of 16 slots, every layer and K/V head
    if variant == QUANTIZED:  # int8 values, one fp32 scale per block and head; keys and values
        expected = 2 * (slots * tiny.head_dim + tiny.n_layers * 96 * tiny.n_kv_heads * 4)
    else:
        expected = 2 * slots * tiny.head_dim * 4  # float32
    assert gauge(served, "mlsys_jax_kv_cache_bytes") == expected


@pytest.mark.slow
def test_a_full_queue_is_429_with_retry_after(checkpoint):
    with serving(checkpoint, "--max-seqs", "1", "--max-queue", "1", "--num-blocks", "32", "--model-name", "x") as url:

        def ask(i: int) -> int:
            body = {"model": "x", "prompt": f"q{i}", "max_tokens": 60, "temperature": 0}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert reply.status_code != 429 or int(reply.headers["Retry-After"]) >= 1
            return reply.status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(ask, range(8)))
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


@pytest.mark.slow
def test_a_client_leaving_mid_stream_frees_its_blocks(served):
    with httpx.stream(
        "POST",
        f"{served}/v1/completions",
        json={"model": "tiny", "prompt": "class A:", "max_tokens": 80, "stream": True, "temperature": 0},
        timeout=60,
    ) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # a token arrived; the request holds blocks now
    deadline = time.time() + 20
    while gauge(served, "mlsys_jax_kv_blocks_used") and time.time() < deadline:
        time.sleep(0.05)
    assert gauge(served, "mlsys_jax_kv_blocks_used") == 0
    assert gauge(served, "mlsys_jax_requests_total", outcome="aborted") >= 1


@pytest.mark.slow
def test_sigterm_lets_a_running_request_finish_and_refuses_new_ones(checkpoint):
    port = free_port()
    command = [sys.executable, "-m", "mlsys_jax.cli", "serve", "--ckpt-dir", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen([*command, "--model-name", "t"], env=env(), stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith(f"serving t on {url}")
        body = {"model": "t", "prompt": "def f(", "max_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            late = httpx.post(f"{url}/v1/completions", json={"model": "t", "prompt": "x"}, timeout=30)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert late.status_code == 503
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
