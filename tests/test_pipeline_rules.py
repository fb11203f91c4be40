"""Pipeline parallelism is a modifier on every rule preset: ``pp_<preset>`` cuts the stacked
layers over the ``pipeline`` axis and shards each stage as ``<preset>`` does."""

from jax.sharding import AbstractMesh, AxisType

from mlsys_jax.meshes import parse_preset
from mlsys_jax.models import get_config, llama
from mlsys_jax.parallel import RULE_PRESETS, Plan, fit_preset, resolve_mesh, rules


def test_every_preset_has_a_pipelined_twin():
    for name, preset in list(RULE_PRESETS.items()):
        if name.startswith("pp"):
            continue
        twin = rules(f"pp_{name}")
        assert twin.pipelined and not preset.pipelined
        assert dict(twin.params) == {**dict(preset.params), "layers": "pipeline"}
        assert twin.activations == preset.activations
    assert dict(rules("pp").params) == {"layers": "pipeline"}


def test_mesh_sizes_with_a_pipeline_axis_pick_the_pipelined_preset():
    assert resolve_mesh("data=2,pipeline=2,tensor=2")[2] == "pp_dp_tp"
    assert resolve_mesh("pipeline=4,fsdp=2")[2] == "pp_fsdp"
    assert resolve_mesh("pipeline=4")[2] == "pp"
    assert resolve_mesh("data=8")[2] == "dp"


def test_a_stage_holds_its_layers_sharded_as_the_base_preset_shards_them():
    mesh = AbstractMesh((4, 2), ("pipeline", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    model = llama.language_model(get_config("tiny", n_layers=8))
    placements = {p.path: p for p in Plan(mesh, rules("pp_fsdp")).placements(model.specs)}
    assert placements["layers/wq"].spec[:2] == ("pipeline", "fsdp")
    assert placements["layers/wq"].shard_shape == (2, 32, 8, 16)
    assert tuple(placements["embed"].spec) == (None, "fsdp")  # outside the stack: as fsdp places it


def test_spare_devices_join_a_stage_axis_never_the_pipeline():
    device = {"kind": "cpu", "platform": "cpu", "peak_bf16_flops": 1, "hbm_bytes": 1, "hbm_bandwidth": 1}
    axes = [{"name": n, "size": 2, "link": "ici"} for n in ("pipeline", "data", "tensor")]
    preset = parse_preset("pp", {"strategy": "pp_fsdp", "device": device, "links": {"ici": {"bandwidth": 1, "latency": 1}}, "axes": axes})  # fmt: skip
    assert {a.name: a.size for a in fit_preset(preset, "pp_fsdp").axes} == {"pipeline": 2, "fsdp": 4}
    assert {a.name: a.size for a in fit_preset(preset, "pp").axes} == {"pipeline": 8}
