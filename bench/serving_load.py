"""Load on ``mlsys-jax serve`` over localhost: Poisson arrivals at three request rates, output
lengths drawn from an exponential distribution, through the official ``openai`` client.

Trains ``llama:tiny`` for a few steps (or takes ``--ckpt-dir``), starts the server in a
subprocess, and for each rate sends ``--requests`` streamed completions at exponential
inter-arrival gaps. Every request must be answered or refused cleanly (429 under overload); the
KV cache must be back to empty after each rate (read from ``/metrics``). Prints one table
(answered, refused, throughput, p50/p99 of time to first token, of time per output token and of
the whole request) and writes ``bench/results/serving_load.json``. Not part of the test suite.

    python bench/serving_load.py [--requests 500] [--rates 2,8,32] [--ckpt-dir runs/train_lm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
from rich.console import Console
from rich.table import Table

RESULTS = ROOT / "bench" / "results" / "serving_load.json"
MEAN_OUTPUT = 24
MAX_OUTPUT = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return out


def train_tiny(folder: Path) -> None:
    command = [sys.executable, str(ROOT / "recipes" / "train_lm.py"), "--model", "tiny", "--steps", "30"]
    command += ["--batch", "16", "--seq", "256", "--sample-tokens", "0", "--no-progress", "--ckpt-dir", str(folder)]
    subprocess.run(command, check=True, env=env(), capture_output=True, timeout=900)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


async def one(client: Any, prompt: str, max_tokens: int, seed: int) -> dict[str, Any]:
    import openai

    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        stream = await client.completions.create(
            model="served",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.8,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        return {"outcome": "refused_429", "seconds": time.perf_counter() - start}
    except openai.APIError as err:
        return {"outcome": f"error: {type(err).__name__}", "seconds": time.perf_counter() - start}
    end = time.perf_counter()
    ttft = (first or end) - start
    return {
        "outcome": "answered",
        "seconds": end - start,
        "ttft": ttft,
        "tpot": (end - (first or end)) / max(tokens - 1, 1),
        "tokens": tokens,
    }


async def load(base_url: str, rate: float, n: int, seed: int) -> tuple[list[dict[str, Any]], float]:
    import openai

    rng = np.random.default_rng(seed)
    words = (ROOT / "README.md").read_text().split()
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    tasks = []
    start = time.perf_counter()
    for i in range(n):
        at = int(rng.integers(0, len(words) - 40))
        prompt = " ".join(words[at : at + int(rng.integers(2, 20))])[:120]  # leaves room in a 256-token context
        max_tokens = int(min(MAX_OUTPUT, 1 + rng.exponential(MEAN_OUTPUT)))
        tasks.append(asyncio.create_task(one(client, prompt, max_tokens, i)))
        await asyncio.sleep(rng.exponential(1 / rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    await client.close()
    return list(results), wall


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rates", default="2,8,32", help="requests per second, comma-separated")
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt_dir
        if ckpt is None:
            ckpt = str(Path(tmp) / "run")
            train_tiny(Path(ckpt))
        port = free_port()
        command = [sys.executable, "-m", "mlsys_jax.cli", "serve", "--ckpt-dir", ckpt, "--port", str(port)]
        command += ["--max-queue", str(args.max_queue), "--model-name", "served"]
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115 - held for the server's lifetime
        server = subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            else:
                raise SystemExit("the server did not come up:\n" + (Path(tmp) / "server.log").read_text()[-3000:])
            rows = []
            for i, rate in enumerate(rates):
                results, wall = asyncio.run(load(f"{base}/v1", rate, args.requests, seed=i))
                metrics = httpx.get(f"{base}/metrics", timeout=10).text
                answered = [r for r in results if r["outcome"] == "answered"]
                rows.append(
                    {
                        "rate": rate,
                        "requests": len(results),
                        "answered": len(answered),
                        "refused_429": sum(r["outcome"] == "refused_429" for r in results),
                        "errors": sum(r["outcome"] not in ("answered", "refused_429") for r in results),
                        "error_kinds": sorted({r["outcome"] for r in results} - {"answered", "refused_429"}),
                        "wall_s": wall,
                        "output_tokens_per_s": sum(r["tokens"] for r in answered) / wall,
                        "ttft_p50_s": pct([r["ttft"] for r in answered], 50),
                        "ttft_p99_s": pct([r["ttft"] for r in answered], 99),
                        "tpot_p50_s": pct([r["tpot"] for r in answered], 50),
                        "tpot_p99_s": pct([r["tpot"] for r in answered], 99),
                        "latency_p50_s": pct([r["seconds"] for r in answered], 50),
                        "latency_p99_s": pct([r["seconds"] for r in answered], 99),
                        "kv_blocks_used_after": metric(metrics, "mlsys_jax_kv_blocks_used"),
                    }
                )
        finally:
            server.terminate()
            server.wait(timeout=120)
            log.close()
    table = Table(title=f"mlsys-jax serve under load: {args.requests} requests per rate, llama:tiny on CPU")
    for col in (
        "rate/s",
        "answered",
        "429",
        "errors",
        "tok/s",
        "TTFT p50/p99 ms",
        "TPOT p50/p99 ms",
        "latency p50/p99 s",
        "KV used after",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['rate']:g}",
            str(r["answered"]),
            str(r["refused_429"]),
            str(r["errors"]),
            f"{r['output_tokens_per_s']:.0f}",
            f"{r['ttft_p50_s'] * 1e3:.0f} / {r['ttft_p99_s'] * 1e3:.0f}",
            f"{r['tpot_p50_s'] * 1e3:.1f} / {r['tpot_p99_s'] * 1e3:.1f}",
            f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f}",
            f"{r['kv_blocks_used_after']:g}",
        )
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"benchmark": "serving_load", "mean_output_tokens": MEAN_OUTPUT, "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
