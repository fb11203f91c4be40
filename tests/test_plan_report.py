"""The plan report every view renders: which shard of a parameter each device holds (as JAX
places it), the memory verdict, and ``mlsys-jax plan``'s --json and its refusals."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mlsys_jax.analysis.report import build_report, shard_ids
from mlsys_jax.cli import main
from mlsys_jax.mesh import make_mesh


@pytest.mark.parametrize(
    "spec",
    [((), ("fsdp",)), (("tensor",), ("fsdp",)), (("data", "tensor"), ()), ((), ()), (("fsdp", "data"), ("tensor",))],
)
def test_each_device_holds_the_shard_jax_places_on_it(spec):
    mesh_sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = make_mesh(mesh_sizes, devices=jax.devices()[:8])
    pspec = PartitionSpec(*[axes or None for axes in spec])
    placed = NamedSharding(mesh, pspec).devices_indices_map((8, 8))
    ids = shard_ids(spec, mesh_sizes)
    devices = list(np.asarray(mesh.devices).flat)  # row-major over the mesh, as shard_ids counts
    blocks = [tuple((s.start or 0) for s in placed[d]) for d in devices]
    # the same shard id exactly where JAX places the same block
    assert all((ids[i] == ids[j]) == (blocks[i] == blocks[j]) for i in range(8) for j in range(8))
    assert len(set(ids)) == len(set(blocks)) and max(ids) == len(set(ids)) - 1


def test_a_report_holds_every_parameter_the_memory_verdict_and_the_pipeline():
    r = build_report(
        model="tiny8",
        mesh="pipeline=2,fsdp=2,tensor=2",
        strategy="pp_fsdp_tp",
        batch=8,
        seq=64,
        microbatches=4,
        hardware="gpu-h100x8",
    )
    assert {p.path for p in r.params} >= {"embed", "layers/wq", "layers/w_down"}
    assert all(len(p.shards) == 8 for p in r.params)
    assert r.memory.hbm == 80 * 2**30 and r.memory.fits and r.fix is None
    assert r.pipeline is not None and len(r.pipeline.grid) == 2 and len(r.memory.stages) == 2
    assert r.prediction is not None and r.prediction.bubble == pytest.approx(r.pipeline.bubble)
    data = json.loads(json.dumps(r.to_json()))
    assert data["memory"]["total"] == r.memory.total and data["prediction"]["mfu"] == pytest.approx(r.prediction.mfu())


def test_plan_json_writes_the_report_and_json_dash_prints_it_alone(tmp_path, capsys):
    out = tmp_path / "plans" / "plan.json"
    assert main(["plan", "--model", "small", "--mesh", "cpu-8", "--seq", "256", "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["model"] == "small" and written["mesh"]["tensor"] == 2 and written["memory"]["fits"] is True
    capsys.readouterr()
    assert main(["plan", "--model", "70b", "--mesh", "gpu-h100x8", "--json", "-"]) == 1
    printed = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert printed["memory"]["fits"] is False and printed["fix"].startswith("--mesh fsdp=16")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "small", "--mesh", "data=8192", "--compile"], "more than the 4096 CPU devices"),
        (["--model", "small", "--mesh", "cpu-8", "--param", "layers/wqq"], "'layers/wqq' is not a parameter"),
        (["--model", "small", "--mesh", "data=8", "--hardware", "gpu-h900"], "unknown mesh preset 'gpu-h900'"),
        (["--model", "small", "--mesh", "tpu-v9"], "unknown mesh preset 'tpu-v9'"),
        (["--model", "small", "--mesh", "tensor=8"], "which does not divide 2"),
    ],
)
def test_bad_plan_input_is_one_message_and_exit_status_2(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_plan_html_writes_one_page_showing_the_chosen_parameter(tmp_path):
    out = tmp_path / "report.html"
    assert (
        main(
            ["plan", "--model", "small", "--mesh", "cpu-8", "--seq", "256", "--param", "layers/wq", "--html", str(out)]
        )
        == 0
    )
    page = out.read_text()
    assert page.lower().startswith("<!doctype html>") and 'id="mesh-svg"' in page
    assert "<option value='layers/wq' selected>" in page  # the parameter --param named is the one shown


def test_plan_auto_prints_the_top_five_with_why_and_the_winner_as_recipe_flags(capsys):
    from mlsys_jax.train.config import RunConfig

    assert main(["plan", "--auto", "--model", "small", "--hardware", "cpu-8", "--seq", "128", "--confirm", "1"]) == 0
    out = capsys.readouterr().out
    assert "auto plan: small on 8 x cpu-8" in out and "#5 " in out and "#1 fastest that fits" in out
    (winner,) = [line for line in out.splitlines() if line.startswith("winner: ")]
    words = winner.removeprefix("winner: ").split()
    flags = {words[i].removeprefix("--").replace("-", "_"): words[i + 1] for i in range(0, len(words), 2)}
    cfg = RunConfig.of(**{k: int(v) if v.isdigit() else v for k, v in flags.items()})
    assert cfg.model.model == "small" and cfg.data.seq == 128  # the recipe takes the winner as printed


def test_plan_auto_needs_a_hardware_preset(capsys):
    assert main(["plan", "--auto", "--model", "small", "--mesh", "data=8"]) == 2
    assert "--auto prices plans on a hardware preset" in capsys.readouterr().err


def test_a_report_that_cannot_be_written_is_one_message_and_leaves_the_old_one_intact(tmp_path, capsys, monkeypatch):
    import errno

    from mlsys_jax.analysis import files

    out = tmp_path / "plan.json"
    out.write_text("the old report")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    status = main(["plan", "--model", "small", "--mesh", "cpu-8", "--seq", "128", "--json", str(out)])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"error: could not write {out}: No space left on device")
    assert "Traceback" not in err and err.count("\n") == 1
    assert out.read_text() == "the old report" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
