"""Meshes from axis sizes or presets; presets ship with the package and describe the hardware."""

import os
import subprocess
import textwrap

import jax
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax.mesh import MeshError
from mlsys_jax.meshes import AXIS_NAMES, PresetError, load_preset, parse_preset, preset_names
from mlsys_jax.parallel import RULE_PRESETS, fit_preset


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


REQUIRED = {"cpu-8", "gpu-h100x8", "gpu-h200x8", "tpu-v5p-64", "tpu-v5e-256", "tpu-v5e-2x256"}


def test_mesh_from_sizes_has_every_axis_in_order(devices):
    mesh = mj.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == AXIS_NAMES
    assert dict(mesh.shape) == {"pipeline": 1, "data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_axis_types_are_auto_so_shardings_propagate(devices):
    mesh = mj.make_mesh(fsdp=8)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_one_axis_may_take_the_rest(devices):
    assert dict(mj.make_mesh(data=2, fsdp=-1).shape)["fsdp"] == 4
    assert dict(mj.make_mesh("data=4,tensor=-1").shape)["tensor"] == 2
    assert dict(mj.make_mesh().shape)["data"] == 8


def test_mesh_from_preset_name(devices):
    mesh = mj.make_mesh("cpu-8")
    assert {k: v for k, v in mesh.shape.items() if v > 1} == {"data": 2, "fsdp": 2, "tensor": 2}


def test_size_one_axes_and_subsets_of_devices(devices):
    mesh = mj.make_mesh(tensor=4, devices=devices[:4])
    assert mesh.size == 4 and dict(mesh.shape)["tensor"] == 4


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"data": 4, "fsdp": 4}, "need 16 devices but 8 are available"),
        ({"tensr": 8}, "unknown mesh axis 'tensr'"),
        ({"data": 0, "fsdp": 8}, "positive integers"),
        ({"data": -1, "fsdp": -1}, "only one mesh axis may be -1"),
        ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
    ],
)
def test_wrong_sizes_get_one_clear_error(devices, kwargs, needle):
    with pytest.raises(MeshError) as err:
        mj.make_mesh(**kwargs)
    assert needle in str(err.value)


def test_wrong_device_count_error_names_the_fix(devices):
    with pytest.raises(MeshError) as err:
        mj.make_mesh("gpu-h100x8", devices=devices[:4])
    msg = str(err.value)
    assert "8 devices but 4 are available" in msg and "Fix" in msg and "--simulate-devices 8" in msg


def test_unreadable_size_string():
    with pytest.raises(MeshError, match="cannot read mesh axis 'data:2'"):
        mj.make_mesh("data:2")


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(PresetError) as err:
        load_preset("gpu-h900x8")
    assert "gpu-h100x8" in str(err.value)


def test_required_presets_ship_with_hardware_figures():
    assert REQUIRED <= set(preset_names())
    for name in preset_names():
        preset = load_preset(name)
        assert preset.device.peak_bf16_flops > 0 and preset.device.hbm_bytes > 0
        assert preset.device.hbm_bandwidth > 0
        for axis in preset.axes:
            link = preset.link_of(axis.name)
            assert link.bandwidth > 0 and link.latency > 0
        assert preset.strategy in RULE_PRESETS


def test_gpu_and_tpu_presets_describe_their_machines():
    assert load_preset("gpu-h100x8").num_devices == 8
    assert load_preset("gpu-h200x8").device.hbm_bytes > load_preset("gpu-h100x8").device.hbm_bytes
    assert load_preset("tpu-v5e-256").num_devices == 256
    assert load_preset("tpu-v5p-64").num_devices == 32  # v5p counts TensorCores: 2 per chip
    two = load_preset("tpu-v5e-2x256")
    assert two.num_devices == 512 and two.num_slices == 2
    assert two.link_of("data").name == "dcn" and two.link_of("fsdp").name == "ici"
    assert two.link_of("data").bandwidth < two.link_of("fsdp").bandwidth


def test_preset_files_are_checked():
    base = {
        "strategy": "fsdp",
        "device": {"kind": "x", "platform": "cpu", "peak_bf16_flops": 1, "hbm_bytes": 1, "hbm_bandwidth": 1},
        "links": {"ici": {"bandwidth": 1, "latency": 1}},
        "axes": [{"name": "fsdp", "size": 8, "link": "ici"}],
    }
    assert parse_preset("ok", base).num_devices == 8
    with pytest.raises(PresetError, match="missing 'peak_bf16_flops'"):
        parse_preset("bad", {**base, "device": {"kind": "x", "platform": "cpu", "hbm_bytes": 1, "hbm_bandwidth": 1}})
    with pytest.raises(PresetError, match="names link 'nvlink'"):
        parse_preset("bad", {**base, "axes": [{"name": "fsdp", "size": 8, "link": "nvlink"}]})
    with pytest.raises(PresetError, match="is not one of"):
        parse_preset("bad", {**base, "axes": [{"name": "model", "size": 8, "link": "ici"}]})
    with pytest.raises(PresetError, match="must follow the order"):
        parse_preset(
            "bad",
            {
                **base,
                "axes": [{"name": "tensor", "size": 2, "link": "ici"}, {"name": "data", "size": 4, "link": "ici"}],
            },
        )


def test_hybrid_layout_keeps_each_slice_contiguous(devices):
    preset = parse_preset(
        "two-slices",
        {
            "strategy": "dp_fsdp",
            "device": {"kind": "cpu", "platform": "cpu", "peak_bf16_flops": 1, "hbm_bytes": 1, "hbm_bandwidth": 1},
            "links": {"ici": {"bandwidth": 2, "latency": 1}, "dcn": {"bandwidth": 1, "latency": 1}},
            "axes": [
                {"name": "data", "size": 4, "slices": 2, "link": "dcn"},
                {"name": "fsdp", "size": 2, "link": "ici"},
            ],
        },
    )
    mesh = mj.make_mesh(preset)
    ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(4, 2)
    # data = 0, 1 live in the first slice (devices 0-3), data = 2, 3 in the second.
    assert sorted(ids[:2].ravel()) == [0, 1, 2, 3]
    assert sorted(ids[2:].ravel()) == [4, 5, 6, 7]


def test_two_slice_tpu_preset_builds_on_512_simulated_devices(python, repo_root):
    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 512)
        import mlsys_jax as mj
        mesh = mj.make_mesh("tpu-v5e-2x256")
        ids = np.vectorize(lambda d: d.id)(mesh.devices)
        data = list(mesh.axis_names).index("data")
        first = np.take(ids, 0, axis=data).ravel()
        second = np.take(ids, 1, axis=data).ravel()
        assert sorted(first) == list(range(256)), sorted(first)[:5]
        assert sorted(second) == list(range(256, 512))
        print("ok", dict(mesh.shape))
        """
    )
    out = subprocess.run(
        [python, "-c", code], check=False, capture_output=True, text=True, cwd=repo_root, env=clean_env(), timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'data': 2" in out.stdout and "'fsdp': 256" in out.stdout


def test_strategy_refits_a_preset_onto_its_own_axes():
    cpu8 = load_preset("cpu-8")
    assert {a.name: a.size for a in fit_preset(cpu8, "fsdp").axes} == {"fsdp": 8}
    assert {a.name: a.size for a in fit_preset(cpu8, "tp").axes} == {"tensor": 8}
    assert {a.name: a.size for a in fit_preset(cpu8, "fsdp_tp").axes} == {"fsdp": 4, "tensor": 2}
    assert fit_preset(cpu8, "dp_fsdp_tp") is cpu8
    two = fit_preset(load_preset("tpu-v5e-2x256"), "fsdp")
    (axis,) = two.axes
    assert (axis.name, axis.size, axis.slices, axis.link) == ("fsdp", 512, 2, "dcn")


def test_sequence_parallel_strategy_keeps_the_sequence_axis():
    preset = parse_preset(
        "sp",
        {
            "strategy": "fsdp",
            "device": {"kind": "cpu", "platform": "cpu", "peak_bf16_flops": 1, "hbm_bytes": 1, "hbm_bandwidth": 1},
            "links": {"ici": {"bandwidth": 1, "latency": 1}},
            "axes": [{"name": "fsdp", "size": 4, "link": "ici"}, {"name": "sequence", "size": 2, "link": "ici"}],
        },
    )
    assert {a.name: a.size for a in fit_preset(preset, "fsdp", sequence_parallel=True).axes} == {
        "fsdp": 4,
        "sequence": 2,
    }
    assert {a.name: a.size for a in fit_preset(preset, "fsdp").axes} == {"fsdp": 8}
