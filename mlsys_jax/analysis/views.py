"""Terminal views of an ``Analysis``: what the compiled step holds per device beside the plan's
prediction, and every collective it runs, grouped by kind, dtype and mesh axes."""

from __future__ import annotations

from rich.table import Table

from mlsys_jax.analysis.compiled_step import Analysis
from mlsys_jax.parallel.memory import human_bytes


def compiled_summary(a: Analysis) -> str:
    """One paragraph: the compiled step's bytes per device against the predicted state, its FLOPs."""
    if a.compiled is None:
        return "; ".join(a.notes) or "not compiled"
    c = a.compiled
    held = a.param_bytes + a.opt_state_bytes
    temps = f"{human_bytes(c.temp_bytes)} of temporaries (XLA:CPU's schedule, not an accelerator's"
    if a.activations is not None:
        predicted = a.activations + a.grad_bytes
        temps += (
            f"; predicted activations + gradients {human_bytes(predicted)}, {predicted / max(c.temp_bytes, 1):.2f}x"
        )
    text = (
        f"compiled ahead of time on {a.devices} simulated CPU devices in {c.compile_seconds:.1f} s: per device "
        f"{human_bytes(c.argument_bytes)} of arguments (predicted parameters + optimizer state "
        f"{human_bytes(held)}, {c.argument_bytes / max(held, 1):.2f}x), {temps}), "
        f"{c.flops / 1e9:,.2f} GFLOP per step"
    )
    return "; ".join((text, *a.notes))


def collectives_table(a: Analysis) -> Table:
    """Collectives per step, one row per (kind, dtype, mesh axes): ops, executions, bytes moved."""
    groups: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
    for r in a.collectives:
        ops_runs_bytes = groups.setdefault((r.kind, r.dtype, r.axes), [0, 0, 0])
        ops_runs_bytes[0] += 1
        ops_runs_bytes[1] += r.count
        ops_runs_bytes[2] += r.count * r.payload_bytes
    table = Table(title=f"collectives per step ({a.strategy} on {a.devices} devices)")
    for name in ("kind", "dtype", "mesh axes", "ops", "runs per step", "bytes per step"):
        table.add_column(name, justify="right" if name in ("ops", "runs per step", "bytes per step") else "left")
    for (kind, dtype, axes), (ops, runs, moved) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
        table.add_row(kind, dtype, ", ".join(axes) or "-", str(ops), f"{runs:,}", human_bytes(moved))
    return table


def prediction_summary(a: Analysis) -> str:
    """The predicted step on the analysis's preset hardware, by part, with MFU and tokens/s."""
    from mlsys_jax.analysis.prediction import predict

    p = predict(a)
    bubble = f", bubble {p.bubble:.1%}" if p.bubble else ""
    return (
        f"predicted on {a.hardware}: compute {p.compute_s * 1e3:.2f} ms, memory {p.memory_s * 1e3:.2f} ms, "
        f"communication {p.comm_s * 1e3:.2f} ms{bubble}; step {p.serial_s * 1e3:.2f} ms without overlap "
        f"(MFU {p.mfu():.1%}, {p.tokens_per_s():,.0f} tokens/s), {p.overlapped_s * 1e3:.2f} ms with "
        f"full overlap (MFU {p.mfu(overlapped=True):.1%})"
    )
