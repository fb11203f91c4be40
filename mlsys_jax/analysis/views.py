"""Terminal views of a ``PlanReport`` (rich): the mesh grid coloured by one parameter's shards,
memory bars with the verdict, collectives with their predicted time, the predicted step, and
the pipeline's stages. The parameter table is ``mlsys_jax.train.report.plan_table``."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from mlsys_jax.analysis.report import ParamRow, PlanReport
from mlsys_jax.parallel.errors import PlanError
from mlsys_jax.parallel.memory import human_bytes

#: Shard colours, cycled; devices holding the same shard share one.
PALETTE = ("blue", "green", "magenta", "cyan", "yellow", "red", "bright_blue", "bright_green")
#: Memory parts and their bar colours.
PART_STYLES = {"parameters": "blue", "gradients": "cyan", "optimizer state": "magenta", "activations": "yellow"}
#: The most devices the grid draws one cell each for, and the most cells across.
GRID_LIMIT = 256
GRID_WIDTH = 16


def largest_param(report: PlanReport) -> ParamRow:
    return max(report.params, key=lambda p: math.prod(p.shape))


def find_param(report: PlanReport, path: str | None) -> ParamRow:
    """The parameter named ``path`` (the largest when None); an unknown name lists the names."""
    if path is None:
        return largest_param(report)
    for p in report.params:
        if p.path == path:
            return p
    names = ", ".join(p.path for p in report.params)
    raise PlanError(f"--param {path!r} is not a parameter of {report.model}. Fix: one of {names}.")


def grid_shape(mesh: dict[str, int]) -> tuple[list[str], list[str], int]:
    """How the grid lays devices out: the axes down the rows (outer), the axes across (inner),
    and the columns, at most ``GRID_WIDTH`` (a wider inner product wraps onto more rows)."""
    names = [a for a, n in mesh.items() if n > 1]
    cols: list[str] = []
    width = 1
    for name in reversed(names):
        if cols and width * mesh[name] > GRID_WIDTH:
            break
        cols.insert(0, name)
        width *= mesh[name]
    return names[: len(names) - len(cols)], cols, min(width, GRID_WIDTH)


def mesh_grid(report: PlanReport, param: ParamRow) -> RenderableType:
    """Each device as a cell holding the number of ``param``'s shard it keeps, coloured by it."""
    used = sorted({a for axes in param.spec for a in axes})
    shown = {k: v for k, v in report.mesh.items() if v > 1} or {"devices": 1}
    head = Text.assemble(
        ("mesh ", "bold"),
        f"{report.devices} devices ({', '.join(f'{k}={v}' for k, v in shown.items())}): the shard of ",
        (param.path, "bold"),
        f" each device holds ({param.placement}; split over {', '.join(used) or 'no axis: replicated'})",
    )
    if report.devices > GRID_LIMIT:
        return Group(head, Text(f"({report.devices} devices: too many cells for a terminal; see --html)"))
    rows, cols, n_cols = grid_shape(report.mesh)
    table = Table(show_header=True, box=None, pad_edge=False, padding=(0, 1))
    table.add_column(("/".join(rows) or "") + " \\ " + ("/".join(cols) or "device"), style="dim", justify="right")
    for c in range(n_cols):
        table.add_column(str(c), justify="right")
    for r in range(report.devices // n_cols):
        cells = []
        for c in range(n_cols):
            shard = param.shards[r * n_cols + c]
            cells.append(Text(f"{shard:>2}", style=f"bold {PALETTE[shard % len(PALETTE)]}"))
        table.add_row(str(r), *cells)
    return Group(head, table)


def bar(parts: dict[str, int], scale: float, width: int) -> Text:
    out = Text()
    for name, n in parts.items():
        out.append("█" * round(n * scale * width), style=PART_STYLES.get(name, "white"))
    return out


def memory_bars(report: PlanReport, width: int = 60) -> RenderableType:
    """One stacked bar per device (per stage under a pipeline) against HBM, then the verdict."""
    m = report.memory
    scale = 1 / max(m.hbm or m.total, m.total, 1)
    zoomed = m.hbm is not None and m.total < m.hbm / 10
    if zoomed:  # too small a share of HBM to see its parts: draw the parts against the total
        scale = 1 / max(m.total, 1)
    title = "memory per device" + (
        f" (bars scaled to the total, {m.total / (m.hbm or 1):.1%} of HBM)" if zoomed else ""
    )
    lines = [Text.assemble((title + " ", "bold"), *[(f"■ {k}  ", s) for k, s in PART_STYLES.items()])]
    stages = m.stages or (m.activations,)
    for i, acts in enumerate(stages):
        parts = {**m.parts(), "activations": acts}
        label = f"stage {i}" if m.stages else "device"
        total = sum(parts.values())
        line = Text(f"{label:<8} ")
        line.append_text(bar(parts, scale, width))
        line.append(f" {human_bytes(total)}")
        lines.append(line)
    if m.hbm is not None and not zoomed:
        lines.append(Text(f"{'HBM':<8} " + "─" * round(m.hbm * scale * width) + f"┤ {human_bytes(m.hbm)}"))
    lines.append(verdict(report))
    return Group(*lines)


def verdict(report: PlanReport) -> Text:
    m = report.memory
    if m.hbm is None:
        return Text("no hardware given (explicit axis sizes): name a preset or --hardware to check the fit")
    over = m.total - m.hbm
    if m.fits:
        return Text.assemble(("fits", "bold green"), f": {m.describe()}")
    fix = f" Fix: {report.fix}." if report.fix else " No single change of batch, remat or strategy makes it fit."
    return Text.assemble(("does not fit", "bold red"), f": {m.describe()}, {human_bytes(over)} too much.{fix}")


def collectives_table(report: PlanReport) -> Table:
    """Collectives per step, one row per (kind, dtype, mesh axes), with the predicted time."""
    source = "compiled" if report.compiled is not None else "from shapes"
    table = Table(
        title=f"collectives per step ({report.strategy} on {report.devices} devices, {source})", title_justify="left"
    )
    for name in ("kind", "dtype", "mesh axes", "ops", "runs per step", "bytes per step", "predicted"):
        table.add_column(name, justify="left" if name in ("kind", "dtype", "mesh axes") else "right")
    for c in report.collectives:
        seconds = "-" if c.seconds_per_step is None else f"{c.seconds_per_step * 1e3:.3f} ms"
        table.add_row(
            c.kind, c.dtype, ", ".join(c.axes) or "-", str(c.ops), f"{c.runs:,}", human_bytes(c.bytes_per_step), seconds
        )
    return table


def compiled_summary(report: PlanReport) -> str:
    """The compiled step's bytes per device against the memory model's, and its FLOPs."""
    c, m = report.compiled, report.memory
    if c is None:
        return (
            "not compiled: collectives from shapes (pass --compile to compile the step ahead of time and read its own)"
        )
    held = m.params + m.opt_state
    predicted = m.activations + m.grads
    return (
        f"compiled ahead of time on {report.devices} simulated CPU devices in {c.compile_seconds:.1f} s: per device "
        f"{human_bytes(c.argument_bytes)} of arguments (predicted parameters + optimizer state {human_bytes(held)}, "
        f"{c.argument_bytes / max(held, 1):.2f}x), {human_bytes(c.temp_bytes)} of temporaries (XLA:CPU's schedule, "
        f"not an accelerator's; predicted activations + gradients {human_bytes(predicted)}, "
        f"{predicted / max(c.temp_bytes, 1):.2f}x), {c.flops / 1e9:,.2f} GFLOP per step"
    )


def prediction_summary(report: PlanReport) -> str:
    """The predicted step on the report's hardware, by part, with MFU and tokens/s."""
    p = report.prediction
    if p is None:
        return "no hardware given: name a preset mesh or pass --hardware to predict the step time"
    bubble = f", bubble {p.bubble:.1%}" if p.bubble else ""
    source = (
        "compiled collectives"
        if report.compiled is not None
        else "collectives from shapes; memory time needs --compile"
    )
    return (
        f"predicted on {report.hardware} ({source}): compute {p.compute_s * 1e3:.2f} ms, memory "
        f"{p.memory_s * 1e3:.2f} ms, communication {p.comm_s * 1e3:.2f} ms{bubble}; step {p.serial_s * 1e3:.2f} ms "
        f"without overlap (MFU {p.mfu():.1%}, {p.tokens_per_s():,.0f} tokens/s), {p.overlapped_s * 1e3:.2f} ms "
        f"with full overlap (MFU {p.mfu(overlapped=True):.1%})"
    )


def pipeline_view(report: PlanReport) -> RenderableType | None:
    """The schedule's table (stages x ticks), its bubble and stash, and each stage's memory."""
    pv = report.pipeline
    if pv is None:
        return None
    head = Text.assemble(
        ("pipeline ", "bold"),
        f"{pv.name}: {pv.stages} stages x {pv.microbatches} microbatches"
        + (f" x {pv.virtual} virtual stages" if pv.virtual > 1 else "")
        + f", {len(pv.grid[0])} ticks, bubble {pv.bubble:.1%}, peak stash {pv.peak_stash} microbatches",
    )
    styles = {"F": "green", "B": "blue", "W": "magenta"}
    width = max((len(c) for row in pv.grid for c in row), default=2)
    rows = []
    state = report.memory.state
    for s, row in enumerate(pv.grid):
        acts = pv.stage_activations[s] if s < len(pv.stage_activations) else 0
        line = Text(f"stage {s} {human_bytes(state + acts):>10} ")
        for cell in row:
            line.append(f"{cell or '.':>{width}} ", style=styles.get(cell[:1], "dim"))
        rows.append(line)
    return Group(head, *rows)
