"""``mlsys-jax plan --html``: the page is self-contained and carries the report (mesh tiles per
device coloured by shard, the parameter selector, the tables and bars, the verdict, the Gantt)."""

from __future__ import annotations

import dataclasses
import json
import math
from html.parser import HTMLParser

import pytest

from mlsys_jax.analysis.html import grid_levels, render_html
from mlsys_jax.analysis.report import ParamRow, PlanReport, build_report, shard_ids

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRS = {"src", "href", "xlink:href", "action", "formaction", "srcset", "poster", "background"}


@dataclasses.dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    ancestors: tuple[str, ...]  # ids of the enclosing elements that have one
    text: str = ""


class Page(HTMLParser):
    """Every element with its attributes, the ids around it and its text; the CSS; the scripts."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.stack: list[Element] = []
        self.css: list[str] = []
        self.feed(source)
        self.close()
        assert not self.stack, f"unclosed elements: {[e.tag for e in self.stack]}"

    def handle_starttag(self, tag, attrs):
        el = Element(tag, {k: v or "" for k, v in attrs}, tuple(e.attrs["id"] for e in self.stack if "id" in e.attrs))
        self.elements.append(el)
        if "style" in el.attrs:
            self.css.append(el.attrs["style"])
        if tag not in VOID:
            self.stack.append(el)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1].tag == tag, f"</{tag}> closes {self.stack[-1].tag if self.stack else None}"
        self.stack.pop()

    def handle_data(self, data):
        for el in self.stack:
            el.text += data
        if self.stack and self.stack[-1].tag == "style":
            self.css.append(data)

    def by_id(self, ident: str) -> Element:
        found = [e for e in self.elements if e.attrs.get("id") == ident]
        assert len(found) == 1, f"id {ident!r} found {len(found)} times"
        return found[0]

    def ids(self) -> set[str]:
        return {e.attrs["id"] for e in self.elements if "id" in e.attrs}

    def within(self, ident: str, tag: str, cls: str | None = None) -> list[Element]:
        return [
            e
            for e in self.elements
            if ident in e.ancestors and e.tag == tag and (cls is None or cls in e.attrs.get("class", "").split())
        ]

    def json(self, ident: str):
        el = self.by_id(ident)
        assert el.tag == "script" and el.attrs.get("type") == "application/json"
        return json.loads(el.text)


PIPED = {
    "model": "small",
    "mesh": "pipeline=2,data=2,tensor=2",
    "strategy": "pp_dp_tp",
    "batch": 16,
    "seq": 128,
    "microbatches": 4,
}


@pytest.fixture(scope="module")
def shapes() -> PlanReport:
    return build_report(model="small", mesh="cpu-8", batch=16, seq=128)


@pytest.fixture(scope="module")
def compiled() -> PlanReport:
    return build_report(compile_step=True, hardware="gpu-h100x8", **PIPED)


@pytest.fixture(scope="module")
def zero_bubble() -> PlanReport:
    """Pipelined, shapes only, no hardware (axis sizes): no verdict and no prediction."""
    return build_report(
        model="small", mesh="pipeline=4,data=2", strategy="pp_dp", batch=16, seq=128, microbatches=8, schedule="zb"
    )


@pytest.fixture(scope="module")
def too_big() -> PlanReport:
    return build_report(model="70b", mesh="gpu-h100x8", batch=64, seq=4096)


@pytest.fixture(scope="module")
def reports(shapes, compiled, zero_bubble, too_big) -> dict[str, PlanReport]:
    return {"shapes": shapes, "compiled": compiled, "zero_bubble": zero_bubble, "too_big": too_big}


def largest(report: PlanReport) -> ParamRow:
    return max(report.params, key=lambda p: math.prod(p.shape))


@pytest.mark.parametrize("name", ["shapes", "compiled", "zero_bubble", "too_big"])
def test_page_is_self_contained(reports, name):
    source = render_html(reports[name])
    page = Page(source)
    assert "http://" not in source and "https://" not in source
    for el in page.elements:
        for attr in URL_ATTRS & el.attrs.keys():
            value = el.attrs[attr]
            assert "//" not in value and ":" not in value, f"<{el.tag} {attr}={value!r}>"
        assert el.tag not in {"link", "img", "iframe", "object", "embed", "base"}, el.tag
        if el.tag == "script":
            assert "src" not in el.attrs
    css = " ".join(page.css)
    assert "url(" not in css and "@import" not in css and "@font-face" not in css
    assert page.by_id("plan-data") and page.by_id("view-data")


@pytest.mark.parametrize("name", ["shapes", "compiled", "zero_bubble", "too_big"])
def test_mesh_has_one_tile_per_device_coloured_by_shard(reports, name):
    report = reports[name]
    page = Page(render_html(report))
    param = largest(report)
    tiles = page.within("mesh-svg", "rect", "tile")
    assert sorted(int(t.attrs["data-device"]) for t in tiles) == list(range(report.devices))
    view = page.json("view-data")
    colors = view["colors"][view["chosen"]]
    assert report.params[view["chosen"]] == param
    for t in tiles:
        shard = int(t.attrs["data-shard"])
        assert shard == param.shards[int(t.attrs["data-device"])]
        assert t.attrs["fill"] == colors[shard]
    # devices hold the same shard exactly when they share a colour
    by_color: dict[str, set[int]] = {}
    for t in tiles:
        by_color.setdefault(t.attrs["fill"], set()).add(int(t.attrs["data-shard"]))
    assert all(len(s) == 1 for s in by_color.values())
    assert len(by_color) == len(set(param.shards))
    assert page.by_id("mesh-svg").tag == "svg" and "mesh" in page.by_id("mesh-svg").ancestors


def test_selector_lists_every_parameter_and_picks_one(compiled):
    page = Page(render_html(compiled, param="embed"))
    options = page.within("param-select", "option")
    assert [o.attrs["value"] for o in options] == [p.path for p in compiled.params]
    assert [o.attrs["value"] for o in options if "selected" in o.attrs] == ["embed"]
    embed = next(p for p in compiled.params if p.path == "embed")
    tiles = page.within("mesh-svg", "rect", "tile")
    assert [int(t.attrs["data-shard"]) for t in sorted(tiles, key=lambda t: int(t.attrs["data-device"]))] == list(
        embed.shards
    )
    legends = [e for e in page.elements if "param-legend" in e.attrs.get("class", "").split()]
    assert len(legends) == len(compiled.params)
    shown = [e for e in legends if "hidden" not in e.attrs]
    assert len(shown) == 1 and "embed" in shown[0].text and "tensor" in shown[0].text
    rows = page.within("param-table", "tr")
    assert len([r for r in rows if "data-param" in r.attrs]) == len(compiled.params)
    with pytest.raises(ValueError, match="not_a_param"):
        render_html(compiled, param="not_a_param")


def test_compiled_pipelined_page_has_every_section(compiled):
    page = Page(render_html(compiled))
    assert {
        "mesh",
        "mesh-svg",
        "param-select",
        "params",
        "param-table",
        "memory",
        "memory-bars",
        "verdict",
        "collectives",
        "collective-table",
        "collective-bars",
        "prediction",
        "prediction-bars",
        "pipeline",
        "pipeline-gantt",
        "compiled",
        "notes",
        "plan-data",
        "view-data",
    } <= page.ids()
    assert len(page.within("collective-table", "tr")) == len(compiled.collectives) + 1  # and the header
    assert len(page.within("collective-bars", "rect", "hbar")) == len(compiled.collectives)
    table = page.by_id("collective-table").text
    for c in compiled.collectives:
        assert c.kind in table and ", ".join(c.axes) in table
    prediction = page.by_id("prediction").text
    p = compiled.prediction
    assert p is not None
    assert f"{p.mfu():.1%}" in prediction and f"{p.tokens_per_s():,.0f}" in prediction
    # the memory bars: the device and each stage, every part, against the HBM
    bars = page.by_id("memory-bars").text
    assert "per device" in bars and "stage 0" in bars and "stage 1" in bars
    parts = {e.attrs["data-part"] for e in page.within("memory-bars", "rect", "part")}
    assert parts == {"parameters", "gradients", "optimizer state", "activations"}
    assert "HBM" in bars


def test_embedded_json_is_the_report(compiled):
    page = Page(render_html(compiled))
    data = page.json("plan-data")
    assert data == json.loads(json.dumps(compiled.to_json()))
    for p, row in zip(compiled.params, data["params"], strict=True):
        assert row["path"] == p.path and row["shards"] == list(p.shards)
    assert data["mesh"] == compiled.mesh


def test_shapes_only_sections_say_what_is_missing(shapes, zero_bubble):
    page = Page(render_html(shapes))
    ids = page.ids()
    assert {"collectives", "pipeline", "compiled", "prediction", "memory-bars"} <= ids
    assert "pipeline-gantt" not in ids
    # the collectives come from shapes, and the page says so
    assert {"collective-table", "collective-bars"} <= ids and shapes.collectives
    assert "from shapes" in page.by_id("collectives").text and "--compile" in page.by_id("collectives").text
    assert "no pipeline" in page.by_id("pipeline").text
    assert "not compiled" in page.by_id("compiled").text
    page = Page(render_html(zero_bubble))
    assert "no hardware" in page.by_id("prediction").text
    assert page.by_id("verdict").attrs["data-fits"] == "unknown"


def test_verdict(shapes, too_big):
    ok = Page(render_html(shapes)).by_id("verdict")
    assert shapes.memory.fits is True
    assert ok.attrs["data-fits"] == "true" and ok.text.startswith("fits") and "does not fit" not in ok.text
    page = Page(render_html(too_big))
    bad = page.by_id("verdict")
    assert too_big.memory.fits is False
    assert bad.attrs["data-fits"] == "false" and "does not fit" in bad.text
    fix = page.by_id("fix").text
    assert (too_big.fix or "No single change") in fix
    assert page.within("memory-bars", "line", "hbm")


@pytest.mark.parametrize("name", ["compiled", "zero_bubble"])
def test_gantt_has_one_cell_per_scheduled_tick(reports, name):
    report = reports[name]
    pv = report.pipeline
    assert pv is not None
    page = Page(render_html(report))
    cells = page.within("pipeline-gantt", "rect", "gantt-cell")
    busy = {(s, t): c for s, row in enumerate(pv.grid) for t, c in enumerate(row) if c}
    assert len(cells) == len(busy)
    assert {(int(e.attrs["data-stage"]), int(e.attrs["data-tick"])): e.attrs["data-cell"] for e in cells} == busy
    kinds = {e.attrs["data-cell"][0]: e.attrs["fill"] for e in cells}
    assert len(set(kinds.values())) == len(kinds)  # F, B (and W) differ
    if name == "zero_bubble":
        assert "W" in kinds
    gantt = page.by_id("pipeline-gantt").text
    assert all(f"stage {s}" in gantt for s in range(pv.stages))
    assert f"{pv.bubble:.1%}" in page.by_id("pipeline").text


def test_text_is_escaped(shapes):
    evil = "<script>alert(1)</script>"
    row = dataclasses.replace(shapes.params[0], path=f"x{evil}")
    report = dataclasses.replace(shapes, notes=(f"note {evil}",), params=(row, *shapes.params[1:]))
    source = render_html(report)
    assert "<script>alert" not in source
    page = Page(source)
    assert evil in page.by_id("notes").text
    assert page.within("param-select", "option")[0].attrs["value"] == f"x{evil}"
    assert page.json("plan-data")["notes"] == [f"note {evil}"]


def test_a_thousand_devices_stay_a_small_grid(shapes):
    mesh = {"data": 4, "fsdp": 32, "tensor": 8}
    params = tuple(
        dataclasses.replace(p, spec=spec, shards=shard_ids(spec, mesh))
        for p in shapes.params
        for spec in [(("fsdp",),) + ((),) * (len(p.shape) - 1)]
    )
    report = dataclasses.replace(shapes, mesh=mesh, params=params)
    page = Page(render_html(report))
    tiles = page.within("mesh-svg", "rect", "tile")
    assert len(tiles) == 1024
    assert not page.within("mesh-svg", "text", "tile-label")  # too small for text
    svg = page.by_id("mesh-svg")
    assert float(svg.attrs["width"]) <= 700 and float(svg.attrs["height"]) <= 700


@pytest.mark.parametrize(
    ("mesh", "down", "across"),
    [
        ({"data": 2, "fsdp": 2, "tensor": 2}, [("data", 2)], [("fsdp", 2), ("tensor", 2)]),
        ({"pipeline": 4, "data": 2}, [("pipeline", 4)], [("data", 2)]),
        ({"fsdp": 256}, [("fsdp", 16)], [("fsdp", 16)]),
        ({"data": 4, "fsdp": 32, "tensor": 8}, [("data", 4), ("fsdp", 8)], [("fsdp", 4), ("tensor", 8)]),
        ({"data": 1}, [], []),
    ],
)
def test_grid_layout(mesh, down, across):
    rows, cols = grid_levels(mesh)
    assert [(lv.name, lv.size) for lv in rows] == down
    assert [(lv.name, lv.size) for lv in cols] == across
