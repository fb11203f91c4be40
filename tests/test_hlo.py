"""Collectives read from compiled HLO: kinds, bytes, groups, loop counts, readings and costs.

Every program here is compiled on the 8 simulated CPU devices with known shapes, so each
expected number follows from the program, not from a previous run.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mlsys_jax as mj
from mlsys_jax import analysis
from mlsys_jax.meshes import Link, parse_preset

F32 = 4


def compile_text(fn, *args, mesh, in_specs, out_specs) -> str:
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    text = jax.jit(mapped).lower(*args).compile().as_text()
    assert text is not None
    return text


def only(colls, kind):
    found = [c for c in colls if c.kind == kind]
    assert len(found) == 1, f"expected one {kind}, got {[c.name for c in colls]}"
    return found[0]


@pytest.fixture(scope="module")
def mesh8(devices):
    return mj.make_mesh(data=2, fsdp=4)


# ---- kinds and bytes ----------------------------------------------------------------------


def test_psum_is_an_all_reduce_of_the_operand(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)  # per device (8, 16) over data x fsdp
    text = compile_text(
        lambda a: jax.lax.psum(a, "fsdp"), x, mesh=mesh8, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp"))
    )
    c = only(analysis.collectives(text), "all-reduce")
    assert c.shapes == ((8, 16),) and c.dtype == "f32"
    assert c.payload_bytes == c.operand_bytes == 8 * 16 * F32
    assert c.group_size == 4 and sorted(map(sorted, c.groups)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert c.count == 1 and c.exact
    assert c.traffic_bytes == pytest.approx(2 * 3 / 4 * 8 * 16 * F32)


def test_all_gather_payload_is_the_gathered_result(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(
        lambda a: jax.lax.all_gather(a, "data", tiled=True),
        x,
        mesh=mesh8,
        in_specs=P(("data", "fsdp")),
        out_specs=P("fsdp"),
    )
    c = only(analysis.collectives(text), "all-gather")
    assert c.shapes == ((16, 16),)
    assert c.result_bytes == c.payload_bytes == 16 * 16 * F32
    assert c.operand_bytes == 8 * 16 * F32
    assert c.group_size == 2 and sorted(map(sorted, c.groups)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert c.traffic_bytes == pytest.approx(1 / 2 * 16 * 16 * F32)


def test_reduce_scatter_payload_is_the_operand(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(
        lambda a: jax.lax.psum_scatter(a, ("data", "fsdp"), tiled=True),
        x,
        mesh=mesh8,
        in_specs=P(("data", "fsdp")),
        out_specs=P(("data", "fsdp")),
    )
    c = only(analysis.collectives(text), "reduce-scatter")
    assert c.group_size == 8
    assert c.operand_bytes == c.payload_bytes == 8 * 16 * F32
    assert c.result_bytes == 1 * 16 * F32
    assert c.traffic_bytes == pytest.approx(7 / 8 * 8 * 16 * F32)


def test_ppermute_is_a_collective_permute_that_sends_its_operand(mesh8):
    perm = [(i, (i + 1) % 4) for i in range(4)]
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(
        lambda a: jax.lax.ppermute(a, "fsdp", perm),
        x,
        mesh=mesh8,
        in_specs=P(("data", "fsdp")),
        out_specs=P(("data", "fsdp")),
    )
    c = only(analysis.collectives(text), "collective-permute")
    assert c.payload_bytes == 8 * 16 * F32 and c.traffic_bytes == 8 * 16 * F32
    assert set(c.pairs) == {(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4)}
    assert c.group_size == 4


def test_all_to_all_counts_every_tuple_element(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(
        lambda a: jax.lax.all_to_all(a, "fsdp", 0, 0, tiled=True),
        x,
        mesh=mesh8,
        in_specs=P(("data", "fsdp")),
        out_specs=P(("data", "fsdp")),
    )
    c = only(analysis.collectives(text), "all-to-all")
    assert c.payload_bytes == 8 * 16 * F32  # 4 pieces of (2, 16) or one (8, 16): same bytes
    assert c.group_size == 4
    assert c.traffic_bytes == pytest.approx(3 / 4 * 8 * 16 * F32)


def test_tuple_all_reduce_sums_its_elements(mesh8):
    x, y = jnp.zeros((8, 16), jnp.float32), jnp.zeros((8, 3), jnp.bfloat16)
    text = compile_text(
        lambda a, b: jax.lax.psum((a, b.astype(jnp.float32)), "data"),
        x,
        y,
        mesh=mesh8,
        in_specs=(P(), P()),
        out_specs=(P(), P()),
    )
    colls = [c for c in analysis.collectives(text) if c.kind == "all-reduce"]
    total = sum(c.payload_bytes for c in colls)
    assert total == (8 * 16 + 8 * 3) * F32
    assert sorted(s for c in colls for s in c.shapes) == [(8, 3), (8, 16)]


# ---- loops --------------------------------------------------------------------------------


def scan_psum(length: int):
    def f(a):
        def body(carry, _):
            return jax.lax.psum(carry, "fsdp") * 0.5, None

        return jax.lax.scan(body, a, None, length=length)[0]

    return f


def test_psum_inside_a_scan_counts_once_per_step(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(scan_psum(5), x, mesh=mesh8, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    c = only(analysis.collectives(text), "all-reduce")
    assert c.count == 5 and c.trip_counts == (5,) and c.exact
    assert c.total_payload_bytes == 5 * 8 * 16 * F32
    assert analysis.summarize([c])["all-reduce"].executions == 5


def test_nested_scans_multiply(mesh8):
    def f(a):
        def outer(carry, _):
            return scan_psum(4)(carry), None

        return jax.lax.scan(outer, a, None, length=3)[0]

    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(f, x, mesh=mesh8, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    c = only(analysis.collectives(text), "all-reduce")
    assert c.count == 12 and c.trip_counts in ((3, 4), (4, 3))


def test_trip_count_is_derived_from_the_condition_when_not_recorded(mesh8):
    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(scan_psum(5), x, mesh=mesh8, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    assert "known_trip_count" not in stripped
    c = only(analysis.collectives(stripped), "all-reduce")
    assert c.count == 5 and c.trip_counts == (5,)


def test_data_dependent_loop_counts_once_and_says_so(mesh8):
    def f(a):
        def cond(carry):
            return jnp.sum(carry[0]) < 100.0

        def body(carry):
            return (jax.lax.psum(carry[0], "fsdp") + 1.0,)

        return jax.lax.while_loop(cond, body, (a,))[0]

    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(f, x, mesh=mesh8, in_specs=P(("data", "fsdp")), out_specs=P(("data", "fsdp")))
    c = only(analysis.collectives(text), "all-reduce")
    assert c.count == 1 and c.trip_counts == (None,) and not c.exact


# ---- replica groups -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{{0,1},{2,3}}", ((0, 1), (2, 3))),
        ("{}", ((0, 1, 2, 3),)),
        ("[4,2]<=[8]", ((0, 1), (2, 3), (4, 5), (6, 7))),
        ("[2,4]<=[4,2]T(1,0)", ((0, 2, 4, 6), (1, 3, 5, 7))),
        ("[4,2]<=[2,2,2]T(2,1,0)", ((0, 4), (2, 6), (1, 5), (3, 7))),
        ("mesh['a'=4,'b'=2] {'a'}", ((0, 2, 4, 6), (1, 3, 5, 7))),
        ("mesh['a'=4,'b'=2] {'b'}", ((0, 1), (2, 3), (4, 5), (6, 7))),
        ("mesh['a'=4,'b'=2], device_ids=([2,2,2]T(0,2,1)) {'a'}", ((0, 1, 4, 5), (2, 3, 6, 7))),
        ("mesh['a'=4,'b'=2] {'a':(2)2}", ((0, 2), (1, 3), (4, 6), (5, 7))),
    ],
)
def test_replica_group_forms(text, expected):
    groups = analysis.parse_replica_groups(text, 4 if text == "{}" else 8)
    assert groups == expected


def test_groups_of_an_auto_partitioned_program_span_the_right_mesh_axes(devices):
    mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)
    sizes = dict(mesh.shape)
    sh = NamedSharding(mesh, P(("data", "tensor"), "fsdp"))
    f = jax.jit(lambda x: (x.sum(0), x.sum(1)), in_shardings=sh, out_shardings=NamedSharding(mesh, P()))
    text = f.lower(jax.ShapeDtypeStruct((16, 16), jnp.float32)).compile().as_text()
    spans = {analysis.collective_axes(c, sizes) for c in analysis.collectives(text) if c.kind == "all-reduce"}
    assert spans == {("data", "tensor"), ("fsdp",)}
    for c in analysis.collectives(text):
        assert sorted(d for g in c.groups for d in g) == list(range(8))


# ---- inferred readings --------------------------------------------------------------------


def test_all_reduce_then_slice_of_this_device_reads_as_a_reduce_scatter(devices):
    mesh = mj.make_mesh(fsdp=8)

    def f(x):
        s = jax.lax.psum(x, "fsdp")
        return jax.lax.dynamic_slice_in_dim(s, jax.lax.axis_index("fsdp") * 8, 8, 0)

    x = jnp.zeros((64, 16), jnp.float32)
    text = compile_text(f, x, mesh=mesh, in_specs=P(None), out_specs=P("fsdp"))
    (c,) = analysis.collectives(text)
    assert c.kind == "all-reduce" and c.sliced == (True,)  # what XLA:CPU runs
    (rs,) = c.as_reduce_scatter()
    assert rs.kind == "reduce-scatter" and rs.inferred
    assert rs.payload_bytes == 64 * 16 * F32 and rs.result_bytes == 8 * 16 * F32
    assert rs.traffic_bytes == pytest.approx(c.traffic_bytes / 2)
    moved = analysis.summarize([c], as_reduce_scatter=True)
    assert moved["all-reduce"].ops == 0 and moved["reduce-scatter"].ops == 1


def test_all_reduce_used_whole_stays_an_all_reduce(devices):
    mesh = mj.make_mesh(fsdp=8)

    def f(x):
        s = jax.lax.psum(x, "fsdp")
        return s[:8] + jax.lax.dynamic_slice_in_dim(s, jax.lax.axis_index("fsdp") * 8, 8, 0)

    x = jnp.zeros((64, 16), jnp.float32)
    (c,) = analysis.collectives(compile_text(f, x, mesh=mesh, in_specs=P(None), out_specs=P("fsdp")))
    assert c.sliced == (False,) and c.as_reduce_scatter() == (c,)


def test_slice_bigger_than_one_shard_is_not_a_scatter(devices):
    mesh = mj.make_mesh(fsdp=8)

    def f(x):
        s = jax.lax.psum(x, "fsdp")
        return jax.lax.dynamic_slice_in_dim(s, jax.lax.axis_index("fsdp") * 4, 16, 0)

    x = jnp.zeros((64, 16), jnp.float32)
    (c,) = analysis.collectives(compile_text(f, x, mesh=mesh, in_specs=P(None), out_specs=P(None)))
    assert c.sliced == (False,)


@pytest.mark.parametrize("op", ["all_gather", "psum"])
def test_bf16_collective_widened_by_the_cpu_backend_reads_back_as_bf16(devices, op):
    mesh = mj.make_mesh(fsdp=8)
    if op == "all_gather":
        fn, out, full = (lambda a: jax.lax.all_gather(a, "fsdp", tiled=True)), P(None), 64
    else:
        fn, out, full = (lambda a: jax.lax.psum(a, "fsdp")), P("fsdp"), 8
    for dtype, program in ((jnp.bfloat16, "bf16"), (jnp.float32, None)):
        x = jnp.zeros((64, 16), dtype)
        (c,) = analysis.collectives(compile_text(fn, x, mesh=mesh, in_specs=P("fsdp"), out_specs=out))
        assert c.dtype == "f32"  # measured: XLA:CPU has no bf16 collectives
        assert c.program_dtypes == (program,)
        assert c.in_program_dtypes().payload_bytes == full * 16 * (2 if program else F32)


MASKED_SUM = """HloModule m, num_partitions=2

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%masked (x: bf16[8], m: pred[8]) -> f32[8] {
  %x = bf16[8]{0} parameter(0)
  %m = pred[8]{0} parameter(1)
  %up = f32[8]{0} convert(%x)
  %zero = f32[] constant(0)
  %zeros = f32[8]{0} broadcast(%zero), dimensions={}
  ROOT %sel = f32[8]{0} select(%m, %up, %zeros)
}

ENTRY %main (x: bf16[8], m: pred[8]) -> OUT {
  %x = bf16[8]{0} parameter(0)
  %m = pred[8]{0} parameter(1)
  %in = f32[8]{0} fusion(%x, %m), kind=kLoop, calls=%masked
  %ar = f32[8]{0} all-reduce(%in), replica_groups={{0,1}}, to_apply=%sum
  ROOT %out = USE
}
"""


@pytest.mark.parametrize(
    "use, program",
    [
        ("bf16[8]{0} convert(%ar)", "bf16"),  # result narrowed straight back: a bf16 reduction
        ("f32[8]{0} multiply(%ar, %ar)", None),  # result used in f32: the program reduced in f32
    ],
)
def test_reduction_reads_as_bf16_only_when_its_result_is_narrowed_back(use, program):
    out = use.split(" ", 1)[0]
    text = MASKED_SUM.replace("OUT", out).replace("USE", use)
    (c,) = analysis.collectives(text)
    assert c.dtype == "f32" and c.program_dtypes == (program,)
    assert c.in_program_dtypes().payload_bytes == 8 * (2 if program else F32)


def test_async_start_done_pairs_count_once():
    text = """HloModule m, num_partitions=4

ENTRY %main (p: f32[8]) -> (f32[32], f32[8], f32[8]) {
  %p = f32[8]{0} parameter(0)
  %ag = (f32[8]{0}, f32[32]{0}) all-gather-start(%p), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[32]{0} all-gather-done(%ag)
  %ar = f32[8]{0} all-reduce-start(%p), replica_groups=[2,2]<=[4], to_apply=%sum
  %ard = f32[8]{0} all-reduce-done(%ar)
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%p), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8]{0} collective-permute-done(%cp)
  ROOT %t = (f32[32]{0}, f32[8]{0}, f32[8]{0}) tuple(%agd, %ard, %cpd)
}
"""
    colls = analysis.collectives(text)
    assert [c.kind for c in colls] == ["all-gather", "all-reduce", "collective-permute"]
    ag, ar, cp = colls
    assert ag.result_bytes == 32 * F32 and ag.operand_bytes == 8 * F32 and ag.group_size == 4
    assert ar.payload_bytes == 8 * F32 and ar.group_size == 2
    assert cp.payload_bytes == 8 * F32 and cp.group_size == 2


def test_text_without_an_entry_is_refused():
    with pytest.raises(analysis.HloParseError, match="ENTRY"):
        analysis.collectives("HloModule m\n")


# ---- traffic and cost ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, factor",
    [
        ("all-reduce", 2 * 7 / 8),
        ("all-gather", 7 / 8),
        ("reduce-scatter", 7 / 8),
        ("all-to-all", 7 / 8),
        ("collective-permute", 1.0),
    ],
)
def test_ring_traffic_formulas(kind, factor):
    assert analysis.ring_traffic(kind, 1024, 8) == pytest.approx(factor * 1024)
    assert analysis.ring_traffic(kind, 1024, 1) == 0.0


def test_alpha_beta_time_on_a_hand_computed_case():
    s = 1 << 20
    c = analysis.Collective(
        name="ar",
        kind="all-reduce",
        dtypes=("f32",),
        shapes=((s // 4,),),
        operand_bytes=s,
        result_bytes=s,
        element_bytes=(s,),
        group_size=8,
        groups=(tuple(range(8)),),
        count=3,
    )
    link = Link("nv", bandwidth=100e9, latency=2e-6)
    one = 14 * 2e-6 + (2 * 7 / 8 * s) / 100e9  # 2(n-1) steps, 2(n-1)/n S bytes
    assert analysis.collective_time(c, link) == pytest.approx(one)
    assert analysis.total_time([c], analysis.uniform_link(link)) == pytest.approx(3 * one)
    assert analysis.ring_steps("all-gather", 8) == 7 and analysis.ring_steps("collective-permute", 8) == 1


def test_each_collective_is_charged_at_the_slowest_link_it_crosses(devices):
    preset = parse_preset(
        "two-slices",
        {
            "strategy": "dp_fsdp",
            "device": {"kind": "x", "platform": "cpu", "peak_bf16_flops": 1.0, "hbm_bytes": 1, "hbm_bandwidth": 1.0},
            "axes": [
                {"name": "data", "size": 2, "link": "dcn", "slices": 2},
                {"name": "fsdp", "size": 4, "link": "ici"},
            ],
            "links": {"dcn": {"bandwidth": 1e9, "latency": 1e-5}, "ici": {"bandwidth": 1e11, "latency": 1e-6}},
        },
    )
    mesh = mj.make_mesh(data=2, fsdp=4)
    x = jnp.zeros((64, 16), jnp.float32)
    spec = P(("data", "fsdp"))
    link_of = analysis.preset_links(preset, dict(mesh.shape))
    for axes, link in ((("fsdp",), "ici"), (("data",), "dcn"), (("data", "fsdp"), "dcn")):
        text = compile_text(lambda a, axes=axes: jax.lax.psum(a, axes), x, mesh=mesh, in_specs=spec, out_specs=spec)
        c = only(analysis.collectives(text), "all-reduce")
        assert analysis.collective_axes(c, dict(mesh.shape)) == axes
        assert link_of(c).name == link
        n = math.prod(dict(mesh.shape)[a] for a in axes)
        expected = preset.links[link].latency * 2 * (n - 1) + c.traffic_bytes / preset.links[link].bandwidth
        assert analysis.total_time([c], link_of) == pytest.approx(expected)


PROMOTED = """HloModule m, num_partitions=2

%REDUCER (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%widen_then_slice (x: bf16[16], i: s32[]) -> f32[8] {
  %x = bf16[16]{0} parameter(0)
  %i = s32[] parameter(1)
  %up = f32[16]{0} convert(%x)
  ROOT %part = f32[8]{0} dynamic-slice(%up, %i), dynamic_slice_sizes={8}
}

ENTRY %main (x: bf16[16], i: s32[]) -> f32[8] {
  %x = bf16[16]{0} parameter(0)
  %i = s32[] parameter(1)
  %in = f32[8]{0} fusion(%x, %i), kind=kLoop, calls=%widen_then_slice
  %ar = f32[8]{0} all-reduce(%in), replica_groups={{0,1}}, to_apply=%REDUCER
  ROOT %out = f32[8]{0} multiply(%ar, %ar)
}
"""


@pytest.mark.parametrize(
    "reducer, program",
    [
        ("sum.clone_promoted", "bf16"),  # the backend's promotion pass widened a bf16 all-reduce
        ("sum", None),  # an f32 reduction of bf16 values that the program asked for
    ],
)
def test_promoted_all_reduce_of_sliced_bf16_values_reads_as_bf16(reducer, program):
    (c,) = analysis.collectives(PROMOTED.replace("REDUCER", reducer))
    assert c.dtype == "f32" and c.program_dtypes == (program,)
    assert c.in_program_dtypes().payload_bytes == 8 * (2 if program else F32)
