"""What int8 costs the demo model in quality and saves in bytes, as served.

Loads a trained run (``make demo``'s ``runs/train_lm`` by default) and measures its validation loss
on the run's own validation batches (the ones its training log reports) in each serving choice:
fp32 and bf16 compute through the training forward; int8 weights (one scale per output channel)
at bf16; through a paged bf16 KV cache and an int8 one (one scale per block and K/V head), fed one
token per call as decoding writes them (``serve.quality``); and int8 weights with an int8 cache.
Each against bf16, with the bytes of the weights and of a KV cache of ``--num-blocks`` blocks.
The issue's bars: int8 weights within 1% of bf16, an int8 cache within 2%, weight bytes at most
0.55x of bf16. Writes ``bench/results/quantization.json``. Not part of the test suite.

    python bench/quantization.py [--ckpt-dir runs/train_lm] [--num-blocks 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "quantization.json"
BARS = {"int8 weights": 0.01, "int8 KV cache": 0.02, "int8 weights + KV cache": 0.02}
WEIGHT_BAR = 0.55


CHOICES = {  # name: (compute dtype, int8 weights, how the loss is computed)
    "fp32": ("float32", False, "forward"),
    "bf16": ("bfloat16", False, "forward"),
    "bf16 KV cache": ("bfloat16", False, "auto"),
    "int8 weights": ("bfloat16", True, "forward"),
    "int8 KV cache": ("bfloat16", False, "int8"),
    "int8 weights + KV cache": ("bfloat16", True, "int8"),
}


def measure(ckpt_dir: str, num_blocks: int, block_size: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    import mlsys_jax as mj
    from mlsys_jax.models.quantized import quantize_params, weight_bytes
    from mlsys_jax.serve.engine import make_pools
    from mlsys_jax.serve.quality import validation_loss
    from mlsys_jax.tokenizer import load_tokenizer
    from mlsys_jax.train import data
    from mlsys_jax.train.saved import restore_run

    plan = mj.Plan(mj.make_mesh(tensor=1, devices=jax.devices()[:1]), mj.rules("tp"))
    runs = {dtype: restore_run(ckpt_dir, None, lambda _: plan, dtype=dtype) for dtype in ("float32", "bfloat16")}
    saved = runs["bfloat16"]
    s = saved.settings
    tokenizer = load_tokenizer(s.get("tokenizer"))
    corpus = data.load_corpus(None if s.get("data") is None else [s["data"]], tokenizer=tokenizer)
    batches = data.val_batches(corpus.val, seq_len=s["seq"], global_batch=s["batch"], num_batches=s["eval_batches"])
    quantized = jax.jit(lambda p: quantize_params(p, saved.model.quantizable))(saved.params)
    rows: list[dict[str, Any]] = []
    for name, (dtype, int8, through) in CHOICES.items():
        run = runs[dtype]
        t0 = time.perf_counter()
        weights = quantized if int8 else run.params
        loss = validation_loss(run.model, plan, weights, batches, through=through, chunk=1)  # pyright: ignore[reportArgumentType]
        rows.append({"choice": name, "compute": dtype, "loss": loss, "seconds": time.perf_counter() - t0})
    bf16 = next(r["loss"] for r in rows if r["choice"] == "bf16")
    for r in rows:
        r["vs_bf16"] = r["loss"] / bf16 - 1
        r["bar"] = BARS.get(r["choice"])
        r["holds"] = None if r["bar"] is None else abs(r["vs_bf16"]) <= r["bar"]
    stored_bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), saved.params)
    weights = {"bf16": weight_bytes(stored_bf16), "int8": weight_bytes(quantized)}
    kv = {
        kind: sum(
            int(x.size * x.dtype.itemsize)
            for x in jax.tree_util.tree_leaves(make_pools(saved.model, plan, num_blocks, block_size, kind)[0])
        )
        for kind in ("auto", "int8")
    }
    return {
        "ckpt_dir": str(Path(ckpt_dir).resolve().relative_to(ROOT))
        if Path(ckpt_dir).resolve().is_relative_to(ROOT)
        else ckpt_dir,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "model": s["model"],
        "step": saved.step,
        "batches": len(batches),
        "batch": s["batch"],
        "seq": s["seq"],
        "rows": rows,
        "weight_bytes": weights,
        "weight_ratio": weights["int8"] / weights["bf16"],
        "weight_bar_holds": weights["int8"] / weights["bf16"] <= WEIGHT_BAR,
        "kv_cache_bytes": kv,
        "kv_ratio": kv["int8"] / kv["auto"],
        "num_blocks": num_blocks,
        "block_size": block_size,
    }


def show(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['model']} step {result['step']}: validation loss as served ({result['batches']} batches)"
    )
    for col in ("choice", "compute", "val loss", "vs bf16", "bar", "holds"):
        table.add_column(col, justify="left" if col == "choice" else "right")
    for r in result["rows"]:
        holds = "" if r["holds"] is None else ("yes" if r["holds"] else "NO")
        bar = "" if r["bar"] is None else f"±{r['bar']:.0%}"
        table.add_row(r["choice"], r["compute"], f"{r['loss']:.5f}", f"{r['vs_bf16']:+.3%}", bar, holds)
    console = Console(width=120)
    console.print(table)
    w, kv = result["weight_bytes"], result["kv_cache_bytes"]
    console.print(
        f"weights: bf16 {w['bf16'] / 2**20:.2f} MiB, int8 {w['int8'] / 2**20:.2f} MiB = {result['weight_ratio']:.3f}x "
        f"(bar {WEIGHT_BAR}x: {'holds' if result['weight_bar_holds'] else 'FAILS'}); KV cache of "
        f"{result['num_blocks']} blocks: bf16 {kv['auto'] / 2**20:.2f} MiB, int8 {kv['int8'] / 2**20:.2f} MiB "
        f"= {result['kv_ratio']:.3f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ckpt-dir", default=str(ROOT / "runs" / "train_lm"))
    parser.add_argument("--num-blocks", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    if not any(p.name.isdigit() for p in Path(args.ckpt_dir).glob("*")):
        print(f"error: {args.ckpt_dir} holds no checkpoint. Fix: run `make demo` first (or pass --ckpt-dir).")
        return 2
    result = measure(args.ckpt_dir, args.num_blocks, args.block_size)
    show(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
