"""A ``PlanReport`` as one self-contained HTML page (``mlsys-jax plan --html``): inline CSS, inline
SVG and a small inline script, nothing fetched. It shows what the terminal views show:

- ``mesh``: one tile per device, outer mesh axes down and inner axes across, coloured by which
  shard of the chosen parameter each device holds (``#param-select`` switches parameters);
- ``params`` (``#param-table``): every parameter's shape, logical axes, placement and bytes;
- ``memory`` (``#memory-bars``): parameters, gradients, optimizer state and activations per
  device (per stage under a pipeline) against HBM, the verdict and the fix;
- ``prediction``: the predicted step by part, with and without overlap, MFU and tokens/s;
- ``collectives`` (``#collective-table``, ``#collective-bars``): what a compiled step runs;
- ``pipeline`` (``#pipeline-gantt``): the schedule as a Gantt chart, its bubble and stash;
- ``compiled`` and ``notes``.

The report itself rides along as JSON (``<script type="application/json" id="plan-data">``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

from mlsys_jax.analysis.report import ParamRow, PlanReport
from mlsys_jax.parallel.memory import human_bytes

#: Shard colours while a parameter has few shards; more get a continuous scale by shard id.
CATEGORICAL = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#86bcb6",
    "#d37295",
    "#a0cbe8",
)
#: Stops of the continuous scale (viridis).
SCALE = ("#46327e", "#365c8d", "#277f8e", "#1fa187", "#4ac16d", "#a0da39", "#fde725")
#: Memory parts (``PlanMemory.parts()`` names) and their colours.
PART_COLORS = {
    "parameters": "#3f6fa8",
    "gradients": "#8db3dd",
    "optimizer state": "#e39b3c",
    "activations": "#8a6fb5",
}
#: Pipeline work and its colours: forward, backward (input gradients under zero bubble), weights.
WORK_COLORS = {"F": "#4e79a7", "B": "#e0913a", "W": "#59a14f"}
#: The mesh drawing's widest extent in pixels.
MESH_WIDTH = 640
#: Approximate width of one character of the 11 px label font.
CHAR_W = 6.4


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(x: float) -> str:
    """A coordinate for SVG: integers bare, else one decimal."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def fmt_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}" if s / scale < 100 else f"{s / scale:,.0f} {unit}"
    return f"{s * 1e9:.3g} ns"


def fmt_share(x: float) -> str:
    """A share as a percentage with two significant figures when small: ``0.014%``."""
    if x >= 0.1:
        return f"{x:.0%}"
    if x >= 0.01:
        return f"{x:.1%}"
    return f"{x * 100:.2g}%"


def fmt_count(n: float) -> str:
    """``1.1M``, ``70.6B``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:,.0f}"


def _plain(x: Any) -> Any:
    """JSON-safe data: non-finite floats become null (``JSON.parse`` rejects NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def json_block(element_id: str, data: Any) -> str:
    """``data`` as JSON inside a script element no text can close early."""
    text = json.dumps(_plain(data), separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def _mix(a: str, b: str, t: float) -> str:
    ra, ga, ba = _hex_rgb(a)
    rb, gb, bb = _hex_rgb(b)
    return "#{:02x}{:02x}{:02x}".format(*(round(x + (y - x) * t) for x, y in ((ra, rb), (ga, gb), (ba, bb))))


def ink_for(color: str) -> str:
    """Dark or light text, whichever reads on ``color``."""
    r, g, b = _hex_rgb(color)
    return "#1d2430" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


def shard_colors(n: int) -> list[str]:
    """One colour per shard id: categorical for a few shards, a continuous scale for many."""
    if n <= 1:
        return [CATEGORICAL[0]]
    if n <= len(CATEGORICAL):
        return list(CATEGORICAL[:n])
    out = []
    for i in range(n):
        t = i / (n - 1) * (len(SCALE) - 1)
        k = min(int(t), len(SCALE) - 2)
        out.append(_mix(SCALE[k], SCALE[k + 1], t - k))
    return out


def shard_count(p: ParamRow, mesh: dict[str, int]) -> int:
    return math.prod(mesh[a] for axes in p.spec for a in axes)


def choose_param(report: PlanReport, path: str | None) -> int:
    """The index of the parameter named ``path``, or of the largest when None."""
    if not report.params:
        raise ValueError(f"plan of {report.model!r} has no parameters to show")
    if path is None:
        return max(range(len(report.params)), key=lambda i: math.prod(report.params[i].shape))
    for i, p in enumerate(report.params):
        if p.path == path:
            return i
    names = ", ".join(p.path for p in report.params)
    raise ValueError(f"parameter {path!r} is not in the plan of {report.model}. Fix: one of {names}.")


# ---------------------------------------------------------------------------------------------
# The mesh


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the mesh grid's rows or columns: a mesh axis, or part of one wrapped."""

    name: str
    size: int
    label: Callable[[int], str]


def grid_levels(mesh: dict[str, int]) -> tuple[list[Level], list[Level]]:
    """The levels down (outer axes) and across (inner axes) of a grid of every device in
    row-major order, as near a 3:2 landscape as the axes allow: the columns are the innermost
    axes, times a divisor of the next one when an axis must wrap (a 256-device axis: 16 x 16)."""
    axes = [(n, s) for n, s in mesh.items() if s > 1]
    total = math.prod(s for _, s in axes)
    best: tuple[float, int, int] | None = None
    for k, (_, size) in enumerate(axes):
        inner = math.prod(s for _, s in axes[k + 1 :])
        for t in (d for d in range(1, size + 1) if size % d == 0):
            cols = inner * t
            rows = total // cols
            score = abs(math.log(cols / rows) - math.log(1.5)) + (1.0 if 1 < t < size else 0.0)
            score += 2.0 if cols > 64 else 0.0
            if best is None or score < best[0] - 1e-9:
                best = (score, k, t)
    if best is None:
        return [], []
    _, k, t = best
    name, size = axes[k]
    down = [Level(n, s, str) for n, s in axes[:k]]
    across = [Level(n, s, str) for n, s in axes[k + 1 :]]
    if t == size:
        across.insert(0, Level(name, size, str))
    elif t == 1:
        down.append(Level(name, size, str))
    else:
        down.append(Level(name, size // t, lambda i, t=t: str(i * t)))
        across.insert(0, Level(name, t, lambda j: f"+{j}"))
    return down, across


def level_positions(levels: list[Level], pitch: float, extra: float) -> list[float]:
    """Offsets of each row (column) with an extra gap at every block boundary of every level."""
    sizes = [lv.size for lv in levels]
    n = math.prod(sizes)
    out = []
    for i in range(n):
        x, w = i * pitch, n
        for s in sizes[:-1]:
            w //= s
            x += (i // w) * extra
        out.append(x)
    return out


def _label_step(needed: float, extent: float) -> int:
    """Label every ``step``-th block so labels of ``needed`` pixels fit blocks ``extent`` wide."""
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256, 512, 1024):
        if needed <= extent * step:
            return step
    return 2048


def _text_w(text: str) -> float:
    return len(text) * CHAR_W


def device_coords(mesh: dict[str, int], device: int) -> dict[str, int]:
    coords, rest = {}, device
    for name, size in reversed(mesh.items()):
        coords[name] = rest % size
        rest //= size
    return {k: coords[k] for k in mesh}


def mesh_svg(report: PlanReport, p: ParamRow, colors: list[str]) -> str:
    """The devices as tiles, coloured by which shard of ``p`` each holds."""
    down, across = grid_levels(report.mesh)
    rows = math.prod(lv.size for lv in down)
    cols = math.prod(lv.size for lv in across)
    label_w = [max(_text_w(lv.name), *(_text_w(lv.label(i)) for i in range(lv.size))) + 12 for lv in down]
    left = sum(label_w) + 4
    right = max((_text_w(lv.name) for lv in across), default=0) + 14
    head_rows = max(len(across), 1)
    top = head_rows * 16 + 8
    boundaries_x = sum(math.prod(lv.size for lv in across[: j + 1]) - 1 for j in range(len(across) - 1))
    boundaries_y = sum(math.prod(lv.size for lv in down[: j + 1]) - 1 for j in range(len(down) - 1))
    avail = MESH_WIDTH - left - right
    tile = (avail - 3 * boundaries_x) / cols
    tile = min(tile, (560 - 3 * boundaries_y) / rows)
    gap = 3.0 if tile >= 24 else 2.0 if tile >= 10 else 1.0
    extra = 6.0 if tile >= 24 else 3.0
    tile = max(4.0, min(72.0, math.floor((avail - extra * boundaries_x) / cols - gap)))
    tile = max(4.0, min(tile, math.floor((560 - extra * boundaries_y) / rows - gap)))
    xs = level_positions(across, tile + gap, extra) if across else [0.0]
    ys = level_positions(down, tile + gap, extra) if down else [0.0]
    width = left + xs[-1] + tile + right
    height = top + ys[-1] + tile + 6
    label = f"{report.devices} devices coloured by the shard of {p.path} each holds"
    size = f'width="{_num(width)}" height="{_num(height)}" viewBox="0 0 {_num(width)} {_num(height)}"'
    out = [f'<svg id="mesh-svg" class="mesh-svg" {size} role="img" aria-label="{_e(label)}">']
    # column headers: one row per level across, the level's name at the right
    for j, lv in enumerate(across):
        y = 8 + j * 16 + 11
        block = math.prod(x.size for x in across[j + 1 :])
        extent = xs[block - 1] + tile - xs[0]
        step = _label_step(max(_text_w(lv.label(i)) for i in range(lv.size)) + 4, extent)
        for b in range(cols // block):
            i = b % lv.size
            if i % step:
                continue
            x0, x1 = xs[b * block], xs[(b + 1) * block - 1] + tile
            out.append(f'<text class="axis-label" x="{_num(left + (x0 + x1) / 2)}" y="{y}">{_e(lv.label(i))}</text>')
        out.append(
            f'<text class="axis-name" x="{_num(left + xs[-1] + tile + 8)}" y="{y}" text-anchor="start">'
            f"{_e(lv.name)}</text>"
        )
    # row headers: one column per level down, the level's name on top
    x = 0.0
    for j, lv in enumerate(down):
        cx = x + label_w[j] - 6
        out.append(f'<text class="axis-name" x="{_num(cx)}" y="{top - 6}" text-anchor="end">{_e(lv.name)}</text>')
        block = math.prod(x.size for x in down[j + 1 :])
        extent = ys[block - 1] + tile - ys[0]
        step = _label_step(13, extent)
        for b in range(rows // block):
            i = b % lv.size
            if i % step:
                continue
            y0, y1 = ys[b * block], ys[(b + 1) * block - 1] + tile
            out.append(
                f'<text class="axis-label" x="{_num(cx)}" y="{_num(top + (y0 + y1) / 2 + 4)}" text-anchor="end">'
                f"{_e(lv.label(i))}</text>"
            )
        x += label_w[j]
    font = min(16.0, max(9.0, tile * 0.3))
    radius = 2 if tile < 16 else 4
    for d in range(report.devices):
        r, c = divmod(d, cols)
        tx, ty = left + xs[c], top + ys[r]
        shard = p.shards[d]
        where = ", ".join(f"{k} {v}" for k, v in device_coords(report.mesh, d).items() if report.mesh[k] > 1)
        out.append(
            f'<rect class="tile" data-device="{d}" data-shard="{shard}" x="{_num(tx)}" y="{_num(ty)}" '
            f'width="{_num(tile)}" height="{_num(tile)}" rx="{radius}" fill="{colors[shard]}">'
            f"<title>device {d}{' · ' + _e(where) if where else ''} · shard {shard}</title></rect>"
        )
        if tile >= 20:
            out.append(
                f'<text class="tile-label" data-device="{d}" x="{_num(tx + tile / 2)}" '
                f'y="{_num(ty + tile / 2 + font * 0.36)}" font-size="{_num(font)}" '
                f'fill="{ink_for(colors[shard])}">{shard}</text>'
            )
        if tile >= 44:
            out.append(
                f'<text class="tile-device" data-device="{d}" x="{_num(tx + 4)}" y="{_num(ty + 11)}" '
                f'fill="{ink_for(colors[shard])}">d{d}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def param_legend(report: PlanReport, i: int, p: ParamRow, colors: list[str], hidden: bool) -> str:
    """Which mesh axes split ``p``, into how many shards of what shape, and the colour key."""
    mesh = report.mesh
    shards = shard_count(p, mesh)
    used = {a for axes in p.spec for a in axes}
    replicated = [f"{a} ({n})" for a, n in mesh.items() if n > 1 and a not in used]
    shard_shape = [
        dim // math.prod(mesh[a] for a in axes) if axes else dim for dim, axes in zip(p.shape, p.spec, strict=True)
    ]
    dims = []
    for k, (dim, logical, axes) in enumerate(zip(p.shape, p.logical_axes, p.spec, strict=True)):
        split = " × ".join(f"{a} ({mesh[a]})" for a in axes) if axes else "not split"
        dims.append(
            f"<li><span class='dim'>dim {k}</span> <code>{_e(logical or '-')}</code> {dim:,} → <b>{_e(split)}</b></li>"
        )
    holders = report.devices // shards
    lines = [
        f"<div class='param-legend' data-param='{i}'{' hidden' if hidden else ''}>",
        (
            f"<div class='legend-title'><code>{_e(p.path)}</code> <span class='muted'>"
            f"{_e('×'.join(map(str, p.shape)))} {_e(p.dtype)}</span></div>"
        ),
        "<p>"
        + (
            f"split into <b>{shards}</b> shards of {_e('×'.join(map(str, shard_shape)))}, "
            f"<b>{_e(human_bytes(p.bytes_per_device))}</b> per device"
            if shards > 1
            else f"<b>replicated</b>: every device holds all of it, {_e(human_bytes(p.bytes_per_device))}"
        )
        + "</p>",
        f"<ul class='dims'>{''.join(dims)}</ul>",
    ]
    if shards > 1:
        rep = (
            f"each shard held by {holders} devices (replicated over {_e(', '.join(replicated))})"
            if replicated
            else "each device holds a different shard"
        )
        lines.append(f"<p class='muted'>{rep}</p>")
    if shards <= len(CATEGORICAL):
        keys = "".join(
            f"<span class='key'><span class='swatch' style='background:{c}'></span>shard {s}</span>"
            for s, c in enumerate(colors)
        )
        lines.append(f"<div class='keys'>{keys}</div>")
    else:
        stops = ", ".join(SCALE)
        lines.append(
            "<div class='scale'><span>shard 0</span>"
            f"<span class='scale-bar' style='background:linear-gradient(90deg, {stops})'></span>"
            f"<span>{shards - 1}</span></div>"
        )
    lines.append("</div>")
    return "".join(lines)


def mesh_section(report: PlanReport, chosen: int, palettes: list[list[str]]) -> str:
    p = report.params[chosen]
    shown = {k: v for k, v in report.mesh.items() if v > 1}
    axes = " × ".join(f"{k} {v}" for k, v in shown.items()) or "one device"
    options = "".join(
        f"<option value='{_e(q.path)}'{' selected' if i == chosen else ''}>{_e(q.path)} · {_e(q.placement)}</option>"
        for i, q in enumerate(report.params)
    )
    legends = "".join(param_legend(report, i, q, palettes[i], hidden=i != chosen) for i, q in enumerate(report.params))
    return (
        "<section id='mesh' class='card'>"
        f"<h2>Mesh <span class='muted'>{report.devices} devices · {_e(axes)}</span></h2>"
        "<div class='controls'><label for='param-select'>Shards of</label>"
        f"<select id='param-select'>{options}</select></div>"
        "<div class='mesh-body'>"
        f"<div class='mesh-figure'>{mesh_svg(report, p, palettes[chosen])}"
        "<p id='mesh-hover' class='muted hover'>Hover a device: the devices holding the same shard light up.</p>"
        "</div>"
        f"<div id='mesh-legend' class='mesh-legend'>{legends}</div>"
        "</div></section>"
    )


# ---------------------------------------------------------------------------------------------
# Parameters


def params_section(report: PlanReport, chosen: int) -> str:
    rows = []
    for i, p in enumerate(report.params):
        rows.append(
            f"<tr data-param='{i}'{' class=selected' if i == chosen else ''}>"
            f"<td><code>{_e(p.path)}</code></td>"
            f"<td class='num'>{_e(' × '.join(map(str, p.shape)))}</td>"
            f"<td>{_e(p.dtype)}</td>"
            f"<td>{_e(', '.join(a or '-' for a in p.logical_axes))}</td>"
            f"<td>{_e(p.placement)}</td>"
            f"<td class='num'>{shard_count(p, report.mesh):,}</td>"
            f"<td class='num'>{_e(human_bytes(p.bytes_per_device))}</td></tr>"
        )
    total = sum(p.bytes_per_device for p in report.params)
    return (
        "<section id='params' class='card'>"
        f"<h2>Parameters <span class='muted'>{len(report.params)} arrays · {fmt_count(report.parameters)} "
        "parameters · click a row to show its shards on the mesh</span></h2>"
        "<div class='scroll'><table id='param-table'><thead><tr><th>parameter</th><th class='num'>shape</th>"
        "<th>dtype</th><th>logical axes</th><th>mesh axes per dim</th><th class='num'>shards</th>"
        "<th class='num'>per device</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody>"
        f"<tfoot><tr><td colspan='6'>total per device</td><td class='num'>{_e(human_bytes(total))}</td></tr>"
        "</tfoot></table></div></section>"
    )


# ---------------------------------------------------------------------------------------------
# Memory


def verdict_html(report: PlanReport) -> str:
    m = report.memory
    if m.hbm is None:
        return (
            "<p id='verdict' class='verdict unknown' data-fits='unknown'>no hardware given (explicit axis sizes): "
            "name a preset or --hardware to check the fit</p>"
        )
    if m.fits:
        return (
            "<p id='verdict' class='verdict ok' data-fits='true'><b>fits</b>: "
            f"{_e(human_bytes(m.total))} of {_e(human_bytes(m.hbm))} HBM per device ({fmt_share(m.total / m.hbm)})</p>"
        )
    over = m.total - m.hbm
    if report.fix:
        fix = f"Fix: <code>{_e(report.fix)}</code>"
    elif m.state > m.hbm:
        fix = (
            "No single change of batch, remat or strategy makes it fit: the state alone is "
            f"{_e(human_bytes(m.state))}. A strategy that shards more of it, more devices, or a smaller model."
        )
    else:
        fix = "No single change of batch, remat or strategy makes it fit."
    return (
        "<div id='verdict' class='verdict bad' data-fits='false'><p><b>does not fit</b>: "
        f"{_e(human_bytes(m.total))} per device against {_e(human_bytes(m.hbm))} of HBM "
        f"({m.total / m.hbm:.1f}×), {_e(human_bytes(over))} too much.</p>"
        f"<p id='fix' class='fix'>{fix}</p></div>"
    )


def memory_svg(report: PlanReport) -> str:
    """Stacked bars of the memory parts per device (per stage when pipelined) against HBM."""
    m = report.memory
    stages = list(m.stages)
    bars: list[tuple[str, dict[str, int]]] = [("per device", m.parts())]
    if len(stages) > 1:
        bars += [(f"stage {s}", {**m.parts(), "activations": a}) for s, a in enumerate(stages)]
    biggest = max(sum(parts.values()) for _, parts in bars)
    zoomed = m.hbm is not None and biggest < m.hbm / 10
    scale_to = max(biggest, 1) * 1.04 if zoomed or m.hbm is None else max(biggest, m.hbm) * 1.04
    left, width, right = 86, 420, 84
    top, bar_h, stage_h = 26, 26, 18
    y = top
    out: list[str] = []
    for k, (label, parts) in enumerate(bars):
        h = bar_h if k == 0 else stage_h
        if k == 1:
            y += 10
        out.append(f"<text class='bar-label' x='{left - 8}' y='{_num(y + h / 2 + 4)}' text-anchor='end'>{label}</text>")
        x = float(left)
        total = sum(parts.values())
        for name, n in parts.items():
            w = n / scale_to * width
            if w <= 0:
                continue
            out.append(
                f"<rect class='part' data-part='{_e(name)}' x='{_num(x)}' y='{y}' width='{max(w, 0.5):.2f}' "
                f"height='{h}' fill='{PART_COLORS[name]}'><title>{_e(label)}: {_e(name)} "
                f"{_e(human_bytes(n))}</title></rect>"
            )
            x += w
        out.append(
            f"<text class='bar-value' x='{left + width + right - 2}' y='{_num(y + h / 2 + 4)}' text-anchor='end'>"
            f"{_e(human_bytes(total))}</text>"
        )
        y += h + 6
    bottom = y
    if m.hbm is not None and not zoomed:
        hx = left + m.hbm / scale_to * width
        anchor = "end" if hx > left + width * 0.7 else "start"
        dx = -4 if anchor == "end" else 4
        out.append(
            f"<line class='hbm' x1='{_num(hx)}' x2='{_num(hx)}' y1='{top - 8}' y2='{bottom - 2}'></line>"
            f"<text class='hbm-label' x='{_num(hx + dx)}' y='{top - 11}' text-anchor='{anchor}'>"
            f"HBM {_e(human_bytes(m.hbm))}</text>"
        )
    elif m.hbm is not None:
        out.append(
            f"<text class='hbm-label off' x='{left + width}' y='{top - 11}' text-anchor='end'>"
            f"HBM {_e(human_bytes(m.hbm))} off scale → (the bars show {fmt_share(biggest / m.hbm)} of it)</text>"
        )
    height = bottom + 4
    total_w = left + width + right
    return (
        f"<svg id='memory-bars' class='bars' width='{total_w}' height='{height}' "
        f"viewBox='0 0 {total_w} {height}' role='img' aria-label='memory per device against HBM'>"
        + "".join(out)
        + "</svg>"
    )


def memory_section(report: PlanReport) -> str:
    m = report.memory
    keys = "".join(
        f"<li><span class='swatch' style='background:{PART_COLORS[name]}'></span>{_e(name)}"
        f"<span class='num'>{_e(human_bytes(n))}</span></li>"
        for name, n in m.parts().items()
    )
    stage_note = ""
    if len(m.stages) > 1:
        stage_note = (
            "<p class='muted small'>Under the pipeline each stage holds its own activations (the per-device bar "
            "shows the largest): its peak stash of microbatches and one chunk's backward at work.</p>"
        )
    notes = "".join(f"<p class='muted small'>{_e(n)}</p>" for n in m.notes)
    return (
        "<section id='memory' class='card'>"
        f"<h2>Memory per device <span class='muted'>{_e(human_bytes(m.total))}</span></h2>"
        f"{verdict_html(report)}"
        f"<div class='scroll'>{memory_svg(report)}</div>"
        f"<ul class='parts'>{keys}</ul>{stage_note}{notes}</section>"
    )


# ---------------------------------------------------------------------------------------------
# Prediction


def hbar_rows(
    svg_id: str, rows: list[tuple[str, float, str, str]], value_text: Callable[[float], str], label_w: int = 230
) -> str:
    """Horizontal bars: (label, value, colour, tooltip) each, scaled to the largest."""
    width, right = 360, 90
    biggest = max((v for _, v, _, _ in rows), default=0.0) or 1.0
    out = []
    y = 6
    for label, value, color, tip in rows:
        w = value / biggest * width
        out.append(
            f"<text class='bar-label' x='{label_w - 8}' y='{y + 13}' text-anchor='end'>{_e(label)}</text>"
            f"<rect class='hbar' x='{label_w}' y='{y}' width='{max(w, 1.0):.2f}' height='18' rx='2' "
            f"fill='{color}'><title>{_e(tip)}</title></rect>"
            f"<text class='bar-value' x='{_num(label_w + max(w, 1.0) + 6)}' y='{y + 13}'>{_e(value_text(value))}</text>"
        )
        y += 24
    total_w = label_w + width + right
    height = y + 2
    return (
        f"<svg id='{svg_id}' class='bars' width='{total_w}' height='{height}' viewBox='0 0 {total_w} {height}' "
        f"role='img'>{''.join(out)}</svg>"
    )


def _stat(label: str, value: str, sub: str = "", cls: str = "") -> str:
    return (
        f"<div class='stat {cls}'><div class='stat-label'>{_e(label)}</div><div class='stat-value'>{_e(value)}</div>"
        f"<div class='stat-sub'>{_e(sub)}</div></div>"
    )


def prediction_section(report: PlanReport) -> str:
    p = report.prediction
    if p is None:
        return (
            "<section id='prediction' class='card'><h2>Predicted step</h2><p class='absent'>no hardware given: "
            "name a preset mesh or pass --hardware to predict the step time</p></section>"
        )
    bound = max(p.compute_s, p.memory_s)
    top, top_s = max(
        (("compute", p.compute_s), ("memory", p.memory_s), ("communication", p.comm_s)), key=lambda kv: kv[1]
    )
    stats = "".join(
        (
            _stat("step, no overlap", fmt_seconds(p.serial_s), f"MFU {p.mfu():.1%}"),
            _stat("step, full overlap", fmt_seconds(p.overlapped_s), f"MFU {p.mfu(overlapped=True):.1%}"),
            _stat("tokens/s", f"{p.tokens_per_s():,.0f}", f"{p.tokens_per_s(overlapped=True):,.0f} with overlap"),
            _stat("bound by", top, f"{top_s / p.serial_s:.0%} of the step without overlap" if p.serial_s else ""),
        )
    )
    rows = [
        ("compute", p.compute_s, "#4e79a7", "model FLOPs at the device's peak"),
        ("memory (HBM traffic)", p.memory_s, "#76b7b2", "bytes the compiled step accesses, at HBM bandwidth"),
        ("communication", p.comm_s, "#e15759", "every collective on the slowest link it crosses"),
    ]
    if p.bubble:
        rows.append(("pipeline bubble", p.serial_s - bound - p.comm_s, "#bab0ac", f"{p.bubble:.1%} of the step idle"))
    source = (
        "compiled collectives"
        if report.compiled is not None
        else "collectives from shapes; HBM traffic needs --compile"
        if report.collectives
        else "shapes only: communication and HBM traffic not counted (pass --compile)"
    )
    return (
        "<section id='prediction' class='card'>"
        f"<h2>Predicted step <span class='muted'>on {_e(report.hardware)} · {_e(source)}</span></h2>"
        f"<div class='stats quad'>{stats}</div>"
        f"{hbar_rows('prediction-bars', rows, fmt_seconds, label_w=150)}"
        f"<p class='muted small'>compute {fmt_seconds(p.compute_s)}, memory {fmt_seconds(p.memory_s)}, "
        f"communication {fmt_seconds(p.comm_s)}, bubble {p.bubble:.1%}: without overlap the step is "
        f"(max(compute, memory) + communication) / (1 − bubble); with full overlap the largest part alone.</p>"
        "</section>"
    )


# ---------------------------------------------------------------------------------------------
# Collectives

KIND_COLORS = {
    "all-reduce": "#4e79a7",
    "all-gather": "#59a14f",
    "reduce-scatter": "#f28e2b",
    "all-to-all": "#b07aa1",
    "collective-permute": "#e15759",
}


def collectives_section(report: PlanReport) -> str:
    source = "compiled" if report.compiled is not None else "from shapes (pass --compile to read the compiled step's)"
    head = (
        f"<h2>Collectives per step <span class='muted'>{_e(report.strategy)} on {report.devices} devices, "
        f"{_e(source)}</span></h2>"
    )
    if report.compiled is None and not report.collectives:
        return (
            f"<section id='collectives' class='card'>{head}<p class='absent'>not compiled: pass --compile to "
            "compile the step ahead of time and list the collectives it runs</p></section>"
        )
    if not report.collectives:
        return (
            f"<section id='collectives' class='card'>{head}<p class='absent'>the step runs no collectives</p></section>"
        )
    priced = all(c.seconds_per_step is not None for c in report.collectives)
    total_s = sum(c.seconds_per_step or 0.0 for c in report.collectives)
    rows = []
    for c in report.collectives:
        s = c.seconds_per_step
        share = f"{s / total_s:.0%}" if s is not None and total_s else "-"
        rows.append(
            f"<tr><td><span class='swatch' style='background:{KIND_COLORS.get(c.kind, '#9c755f')}'></span>"
            f"{_e(c.kind)}</td><td>{_e(c.dtype)}</td><td>{_e(', '.join(c.axes) or '-')}</td>"
            f"<td class='num'>{c.ops:,}</td><td class='num'>{c.runs:,}</td>"
            f"<td class='num'>{_e(human_bytes(c.bytes_per_step))}</td>"
            f"<td class='num'>{_e('-' if s is None else fmt_seconds(s))}</td><td class='num'>{share}</td></tr>"
        )
    table = (
        "<div class='scroll'><table id='collective-table'><thead><tr><th>kind</th><th>dtype</th><th>mesh axes</th>"
        "<th class='num'>ops</th><th class='num'>runs per step</th><th class='num'>bytes per step</th>"
        "<th class='num'>predicted</th><th class='num'>share</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
    bars = [
        (
            f"{c.kind} {c.dtype} · {'×'.join(c.axes) or '-'}",
            (c.seconds_per_step or 0.0) if priced else float(c.bytes_per_step),
            KIND_COLORS.get(c.kind, "#9c755f"),
            f"{c.ops} ops, {c.runs:,} runs, {human_bytes(c.bytes_per_step)} per step",
        )
        for c in report.collectives
    ]
    what = "predicted time per step" if priced else "bytes per step (no hardware to price them)"
    return (
        f"<section id='collectives' class='card'>{head}"
        f"{table}<h3 class='gap'>{what}</h3>"
        f"{hbar_rows('collective-bars', bars, fmt_seconds if priced else human_bytes, label_w=260)}"
        "</section>"
    )


# ---------------------------------------------------------------------------------------------
# Pipeline


def _work_color(cell: str, virtual: int) -> str:
    base = WORK_COLORS.get(cell[:1], "#9c755f")
    if virtual > 1 and "." in cell:
        chunk = int(cell.split(".")[1])
        return _mix(base, "#ffffff", 0.45 * chunk / (virtual - 1))
    return base


def pipeline_section(report: PlanReport) -> str:
    pv = report.pipeline
    if pv is None:
        return (
            "<section id='pipeline' class='card'><h2>Pipeline</h2><p class='absent'>no pipeline: the mesh has no "
            "pipeline axis larger than 1</p></section>"
        )
    ticks = max((len(r) for r in pv.grid), default=0)
    left, right = 64, 150
    cell = max(6.0, min(48.0, math.floor((1180 - left - right) / max(ticks, 1))))
    row_h = 26
    top = 22
    out = []
    tick_step = _label_step(_text_w(str(ticks)) + 4, cell)
    for t in range(0, ticks, tick_step):
        out.append(f"<text class='axis-label' x='{_num(left + t * cell + cell / 2)}' y='14'>{t}</text>")
    state = report.memory.state
    for s, row in enumerate(pv.grid):
        y = top + s * row_h
        out.append(f"<text class='bar-label' x='{left - 8}' y='{y + 16}' text-anchor='end'>stage {s}</text>")
        out.append(
            f"<rect class='gantt-lane' x='{left}' y='{y}' width='{_num(ticks * cell)}' height='{row_h - 4}' rx='2'>"
            "</rect>"
        )
        for t, c in enumerate(row):
            if not c:
                continue
            kind = {"F": "forward", "B": "backward", "W": "weight gradients"}.get(c[:1], c[:1])
            mb = c[1:]
            micro, _, chunk = mb.partition(".")
            tip = f"stage {s}, tick {t}: {kind} of microbatch {micro}" + (f", chunk {chunk}" if chunk else "")
            color = _work_color(c, pv.virtual)
            x = left + t * cell
            out.append(
                f"<rect class='gantt-cell' data-stage='{s}' data-tick='{t}' data-cell='{_e(c)}' x='{_num(x + 0.5)}' "
                f"y='{y}' width='{_num(cell - 1)}' height='{row_h - 4}' rx='2' fill='{color}'>"
                f"<title>{_e(tip)}</title></rect>"
            )
            if cell >= 8 * len(mb) + 4:
                out.append(
                    f"<text class='gantt-text' x='{_num(x + cell / 2)}' y='{y + 15}' fill='{ink_for(color)}'>"
                    f"{_e(mb)}</text>"
                )
        acts = pv.stage_activations[s] if s < len(pv.stage_activations) else 0
        out.append(
            f"<text class='bar-value' x='{_num(left + ticks * cell + 10)}' y='{y + 16}'>"
            f"{_e(human_bytes(state + acts))} / device</text>"
        )
    width = left + ticks * cell + right
    height = top + len(pv.grid) * row_h + 4
    svg = (
        f"<svg id='pipeline-gantt' class='gantt' width='{_num(width)}' height='{height}' "
        f"viewBox='0 0 {_num(width)} {height}' role='img' aria-label='pipeline schedule'>{''.join(out)}</svg>"
    )
    has_w = any(c.startswith("W") for row in pv.grid for c in row)
    names = {"F": "forward", "B": "backward (input gradients)" if has_w else "backward", "W": "weight gradients"}
    keys = "".join(
        f"<span class='key'><span class='swatch' style='background:{WORK_COLORS[k]}'></span>{k} {names[k]}</span>"
        for k in ("F", "B", "W")
        if k != "W" or has_w
    )
    if pv.virtual > 1:
        keys += "<span class='key muted'>lighter: later chunk on the device (microbatch.chunk)</span>"
    stats = "".join(
        (
            _stat("schedule", pv.name, f"{pv.stages} stages × {pv.microbatches} microbatches"),
            _stat("bubble", f"{pv.bubble:.1%}", "of each stage's ticks idle"),
            _stat("peak stash", f"{pv.peak_stash}", "microbatches held at once"),
            _stat("ticks", f"{ticks}", f"{pv.virtual} virtual stage{'s' if pv.virtual > 1 else ''} per device"),
        )
    )
    per_stage = ", ".join(f"stage {s}: {human_bytes(a)} activations" for s, a in enumerate(pv.stage_activations))
    return (
        "<section id='pipeline' class='card'>"
        f"<h2>Pipeline <span class='muted'>{_e(pv.name)} · bubble {pv.bubble:.1%}</span></h2>"
        f"<div class='stats'>{stats}</div>"
        f"<div class='keys'>{keys}</div>"
        f"<div class='scroll'>{svg}</div>"
        f"<p class='muted small'>Each cell is one tick of one stage, numbered by microbatch; at the right, the "
        f"memory per device of each stage ({_e(per_stage)}).</p></section>"
    )


# ---------------------------------------------------------------------------------------------
# Compiled figures, notes, the page


def compiled_section(report: PlanReport) -> str:
    c, m = report.compiled, report.memory
    if c is None:
        return (
            "<section id='compiled' class='card'><h2>Compiled step</h2><p class='absent'>not compiled: shapes only "
            "(pass --compile to compile the step ahead of time on simulated CPU devices)</p></section>"
        )
    held = m.params + m.opt_state
    predicted = m.activations + m.grads
    rows = (
        ("arguments", human_bytes(c.argument_bytes), f"parameters + optimizer state predicted {human_bytes(held)}"),
        ("outputs", human_bytes(c.output_bytes), ""),
        (
            "temporaries",
            human_bytes(c.temp_bytes),
            f"XLA:CPU's schedule; activations + gradients predicted {human_bytes(predicted)}",
        ),
        ("FLOPs per step", f"{c.flops / 1e9:,.2f} GFLOP", "per device"),
        (
            "memory traffic",
            human_bytes(c.bytes_per_step),
            f"per device, loops by their trips (XLA counts {human_bytes(c.bytes_accessed)})",
        ),
        ("compile time", f"{c.compile_seconds:.1f} s", f"on {report.devices} simulated CPU devices"),
    )
    body = "".join(
        f"<tr><td>{_e(a)}</td><td class='num'>{_e(b)}</td><td class='muted wrap'>{_e(n)}</td></tr>" for a, b, n in rows
    )
    return (
        "<section id='compiled' class='card'><h2>Compiled step <span class='muted'>per device, from XLA</span></h2>"
        f"<table id='compiled-table'><tbody>{body}</tbody></table></section>"
    )


def notes_section(report: PlanReport) -> str:
    notes = list(dict.fromkeys((*report.notes, *report.memory.notes)))
    body = "".join(f"<li>{_e(n)}</li>" for n in notes) if notes else "<li class='muted'>no notes</li>"
    return f"<section id='notes' class='card'><h2>Notes</h2><ul class='notes'>{body}</ul></section>"


def header(report: PlanReport) -> str:
    shown = {k: v for k, v in report.mesh.items() if v > 1}
    mesh = ",".join(f"{k}={v}" for k, v in shown.items()) or "1 device"
    hardware = (
        f"{report.hardware}" + (f" ({report.device_kind})" if report.device_kind else "")
        if report.hardware
        else "none given"
    )
    facts = (
        ("strategy", report.strategy),
        (
            "mesh",
            mesh if report.mesh_label.replace(" ", "") == mesh.replace(" ", "") else f"{report.mesh_label} · {mesh}",
        ),
        ("devices", f"{report.devices:,}"),
        ("hardware", hardware),
        ("batch", f"{report.batch} × {report.seq} tokens"),
        ("microbatches", str(report.microbatches)),
    )
    chips = "".join(f"<span class='chip'><span class='muted'>{_e(k)}</span> {_e(v)}</span>" for k, v in facts)
    m, p = report.memory, report.prediction
    fits = "unknown" if m.fits is None else "fits" if m.fits else "does not fit"
    cls = "" if m.fits is None else "good" if m.fits else "bad"
    if not m.hbm:
        share = "no HBM given"
    elif m.total > m.hbm:
        share = f"{m.total / m.hbm:.1f}× the {human_bytes(m.hbm)} of HBM"
    else:
        share = f"{fmt_share(m.total / m.hbm)} of {human_bytes(m.hbm)}"
    stats = [_stat("memory per device", human_bytes(m.total), f"{fits} · {share}", cls)]
    if p is not None:
        stats += [
            _stat("step", fmt_seconds(p.serial_s), f"{fmt_seconds(p.overlapped_s)} with full overlap"),
            _stat("MFU", f"{p.mfu():.1%}", f"{p.mfu(overlapped=True):.1%} with full overlap"),
            _stat("tokens/s", f"{p.tokens_per_s():,.0f}", f"{fmt_count(p.tokens)} tokens per step"),
        ]
    return (
        "<header>"
        f"<h1>{_e(report.model)} <span class='muted'>{fmt_count(report.parameters)} parameters</span></h1>"
        f"<div class='chips'>{chips}</div>"
        f"<div class='stats summary'>{''.join(stats)}</div>"
        "</header>"
    )


CSS = """
:root { --bg:#f5f6f8; --card:#ffffff; --line:#e2e5ea; --ink:#1d2430; --muted:#6b7482; --accent:#3f6fa8;
  --good:#2f7d4f; --good-bg:#e8f4ec; --bad:#b3372f; --bad-bg:#fbeceb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main, header { max-width: 1280px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; padding-bottom: 8px; }
h1 { font-size: 22px; margin: 0 0 10px; font-weight: 650; }
h2 { font-size: 15px; margin: 0 0 12px; font-weight: 650; }
h3 { font-size: 12px; margin: 0 0 6px; font-weight: 600; color: var(--muted); text-transform: uppercase;
  letter-spacing: .04em; }
h2 .muted, h1 .muted { font-weight: 400; margin-left: 6px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: var(--muted); }
.small { font-size: 12.5px; margin: 8px 0 0; }
.chips { display:flex; flex-wrap:wrap; gap:6px; margin-bottom: 14px; }
.chip { background: var(--card); border:1px solid var(--line); border-radius: 999px; padding: 2px 10px;
  font-size: 12.5px; }
.stats { display:grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; margin-bottom: 12px; }
.stat { background: var(--card); border:1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
.card .stat { background: #fafbfc; }
.stats.quad { grid-template-columns: repeat(2, minmax(0, 1fr)); }
.stat-label { font-size: 11.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
.stat-value { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat-sub { font-size: 12px; color: var(--muted); }
.stat.good { border-color: #b9dcc6; background: var(--good-bg); }
.stat.good .stat-sub { color: var(--good); }
.stat.bad { border-color: #efc2bf; background: var(--bad-bg); }
.stat.bad .stat-sub { color: var(--bad); }
main { display:grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; padding-bottom: 32px; }
.card { background: var(--card); border:1px solid var(--line); border-radius: 10px; padding: 16px 18px;
  min-width: 0; }
#mesh, #params, #pipeline, #collectives { grid-column: 1 / -1; }
.scroll { overflow-x: auto; }
svg { display:block; max-width: 100%; height: auto; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  font-variant-numeric: tabular-nums; }
.controls { display:flex; align-items:center; gap:8px; margin-bottom: 12px; }
.controls label { color: var(--muted); }
select { font: inherit; padding: 4px 8px; border:1px solid var(--line); border-radius: 6px; background:#fff;
  max-width: 100%; }
.mesh-body { display:flex; gap: 28px; align-items:flex-start; flex-wrap: wrap; }
.mesh-figure { flex: 0 1 auto; min-width: 0; }
.mesh-legend { flex: 1 1 280px; min-width: 260px; }
.mesh-legend p { margin: 6px 0; }
.legend-title { font-size: 14px; margin-bottom: 4px; }
.dims { margin: 6px 0; padding-left: 0; list-style: none; }
.dims li { padding: 2px 0; }
.dims .dim { display:inline-block; width: 44px; color: var(--muted); }
.keys { display:flex; flex-wrap:wrap; gap: 6px 14px; margin: 8px 0; font-size: 12.5px; }
.key { display:inline-flex; align-items:center; }
.swatch { display:inline-block; width: 11px; height: 11px; border-radius: 3px; margin-right: 6px;
  vertical-align: -1px; }
.scale { display:flex; align-items:center; gap:8px; font-size:12.5px; margin-top: 8px; }
.scale-bar { display:inline-block; width: 180px; height: 11px; border-radius: 3px; }
.hover { min-height: 1.4em; margin: 8px 0 0; font-size: 12.5px; }
.tile { stroke: rgba(0,0,0,.08); stroke-width: 1; transition: opacity .12s; }
.tile-label { text-anchor: middle; font-weight: 600; pointer-events: none; }
.tile-device { font-size: 9px; opacity: .75; pointer-events: none; }
#mesh-svg.focus .tile { opacity: .22; }
#mesh-svg.focus .tile.same { opacity: 1; }
#mesh-svg.focus .tile.here { stroke: var(--ink); stroke-width: 2; }
.axis-label { font-size: 11px; fill: var(--muted); text-anchor: middle; }
.axis-name { font-size: 11px; fill: var(--ink); font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px; border-bottom: 1px solid var(--line);
  padding: 6px 10px; white-space: nowrap; }
td { padding: 5px 10px; border-bottom: 1px solid #eef0f3; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; border-bottom: none; }
#param-table tbody tr { cursor: pointer; }
#param-table tbody tr:hover { background: #f3f6fa; }
#param-table tbody tr.selected { background: #eaf1f9; }
#param-table tbody tr.selected td:first-child { box-shadow: inset 3px 0 0 var(--accent); }
.verdict { border-radius: 8px; padding: 8px 12px; margin: 0 0 12px; }
.verdict p { margin: 0; }
.verdict p + p { margin-top: 4px; }
.verdict.ok { background: var(--good-bg); color: var(--good); }
.verdict.bad { background: var(--bad-bg); color: var(--bad); }
.verdict.bad .fix { color: var(--ink); }
.verdict.unknown { background: #f1f2f4; color: var(--muted); }
.bar-label { font-size: 12px; fill: var(--ink); }
.bar-value { font-size: 12px; fill: var(--muted); }
.hbm { stroke: var(--bad); stroke-width: 1.5; stroke-dasharray: 4 3; }
.hbm-label { font-size: 11.5px; fill: var(--bad); font-weight: 600; }
.hbm-label.off { fill: var(--muted); font-weight: 400; }
.parts { list-style:none; padding:0; margin: 10px 0 0; display:grid; grid-template-columns: repeat(2, minmax(0,1fr));
  gap: 2px 18px; font-size: 13px; }
.parts li { display:flex; align-items:center; }
.parts .num { margin-left:auto; font-variant-numeric: tabular-nums; }
.absent { color: var(--muted); font-style: italic; margin: 0; }
h3.gap { margin-top: 18px; }
td.wrap { white-space: normal; }
.gantt-lane { fill: #f1f2f4; }
.gantt-text { font-size: 11px; text-anchor: middle; font-weight: 600; pointer-events: none; }
.notes { margin: 0; padding-left: 18px; }
@media (max-width: 900px) { main { grid-template-columns: minmax(0, 1fr); } }
"""

SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('plan-data').textContent);
  var view = JSON.parse(document.getElementById('view-data').textContent);
  var select = document.getElementById('param-select');
  var svg = document.getElementById('mesh-svg');
  var hover = document.getElementById('mesh-hover');
  var tiles = Array.prototype.slice.call(svg.querySelectorAll('rect.tile'));
  var texts = {};
  svg.querySelectorAll('text[data-device]').forEach(function (t) {
    (texts[t.getAttribute('data-device')] = texts[t.getAttribute('data-device')] || []).push(t);
  });
  var names = Object.keys(data.mesh);
  function where(d) {
    var out = [], rest = d, coords = {};
    for (var k = names.length - 1; k >= 0; k--) {
      var n = data.mesh[names[k]];
      coords[names[k]] = rest % n;
      rest = Math.floor(rest / n);
    }
    names.forEach(function (a) { if (data.mesh[a] > 1) out.push(a + ' ' + coords[a]); });
    return out;
  }
  function device(d) {
    var at = where(d);
    return 'device ' + d + (at.length ? ' · ' + at.join(', ') : '');
  }
  var current = view.chosen;
  function show(i) {
    current = i;
    var p = data.params[i], colors = view.colors[i], inks = view.inks[i];
    tiles.forEach(function (r) {
      var d = r.getAttribute('data-device'), s = p.shards[+d];
      r.setAttribute('fill', colors[s]);
      r.setAttribute('data-shard', String(s));
      var title = r.querySelector('title');
      if (title) title.textContent = device(+d) + ' · shard ' + s;
      (texts[d] || []).forEach(function (t) {
        t.setAttribute('fill', inks[s]);
        if (t.classList.contains('tile-label')) t.textContent = String(s);
      });
    });
    document.querySelectorAll('.param-legend').forEach(function (el) {
      el.hidden = el.getAttribute('data-param') !== String(i);
    });
    document.querySelectorAll('#param-table tbody tr').forEach(function (tr) {
      tr.classList.toggle('selected', tr.getAttribute('data-param') === String(i));
    });
    if (select.selectedIndex !== i) select.selectedIndex = i;
  }
  select.addEventListener('change', function () { show(select.selectedIndex); });
  document.querySelectorAll('#param-table tbody tr').forEach(function (tr) {
    tr.addEventListener('click', function () {
      show(+tr.getAttribute('data-param'));
      document.getElementById('mesh').scrollIntoView({behavior: 'smooth', block: 'start'});
    });
  });
  var idle = hover.textContent;
  svg.addEventListener('mouseover', function (ev) {
    var r = ev.target;
    if (!r.classList || !r.classList.contains('tile')) return;
    var s = r.getAttribute('data-shard'), same = 0;
    svg.classList.add('focus');
    tiles.forEach(function (t) {
      var hit = t.getAttribute('data-shard') === s;
      t.classList.toggle('same', hit);
      t.classList.toggle('here', t === r);
      if (hit) same++;
    });
    var d = +r.getAttribute('data-device');
    hover.textContent = device(d) + ' holds shard ' + s + ' of ' +
      data.params[current].path + ', as do ' + (same - 1) + ' other device' + (same === 2 ? '' : 's');
  });
  svg.addEventListener('mouseleave', function () {
    svg.classList.remove('focus');
    hover.textContent = idle;
  });
  show(current);
  document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
  document.body.setAttribute('data-ready', 'true');
})();
"""


def render_html(report: PlanReport, param: str | None = None) -> str:
    """The report as one self-contained HTML page; the mesh first shows ``param``'s shards (the
    largest parameter's when None)."""
    chosen = choose_param(report, param)
    palettes = [shard_colors(shard_count(p, report.mesh)) for p in report.params]
    view = {"chosen": chosen, "colors": palettes, "inks": [[ink_for(c) for c in pal] for pal in palettes]}
    title = f"{report.model} · {report.strategy} on {report.mesh_label} — mlsys-jax plan"
    sections: Iterable[str] = (
        mesh_section(report, chosen, palettes),
        memory_section(report),
        prediction_section(report),
        pipeline_section(report),
        collectives_section(report),
        params_section(report, chosen),
        compiled_section(report),
        notes_section(report),
    )
    return "".join(
        (
            "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
            header(report),
            f"<main>{''.join(sections)}</main>",
            json_block("plan-data", report.to_json()),
            json_block("view-data", view),
            f"<script>{SCRIPT}</script>",
            "</body></html>\n",
        )
    )


__all__ = ["render_html"]
