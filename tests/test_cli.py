"""The ``mlsys-jax`` command: ``plan`` shows bytes per device on hardware you do not have."""

import io

import pytest
from rich.console import Console

import mlsys_jax as mj
from mlsys_jax.cli import PlanConfig, main, plan


def run_plan(**kwargs):
    out = io.StringIO()
    fits = plan(PlanConfig(**kwargs), console=Console(file=out, width=200))
    return fits, out.getvalue()


def test_70b_does_not_fit_one_h100_node_with_fsdp():
    fits, text = run_plan(model="70b", mesh="gpu-h100x8")
    assert not fits
    assert "does not fit" in text and "of 80.00 GiB" in text and "too much" in text
    # the state alone is too big for 8 devices: the fix is more of them, with the figure after
    assert "Fix: --mesh fsdp=16 --strategy fsdp --batch 16 --remat full" in " ".join(text.split())
    assert "plan: 70b under fsdp on gpu-h100x8, batch 8 x 2048 (fsdp=8, 8 devices)" in text


def test_70b_fits_a_v5p_64_slice_with_fsdp_and_tensor_parallelism():
    fits, text = run_plan(model="70b", mesh="tpu-v5p-64", strategy="fsdp_tp")
    assert not fits and "does not fit" in text
    assert "Fix: --remat full (then 43.40 GiB" in " ".join(text.split())  # the activations, kept for the backward
    fits, text = run_plan(model="70b", mesh="tpu-v5p-64", strategy="fsdp_tp", remat="full")
    assert fits and "fits: 43.40 GiB" in text
    assert "layers/w_down" in text and "tensor, fsdp" in text


def test_a_model_is_named_by_family_and_preset():
    fits, text = run_plan(model="llama:70b", mesh="tpu-v5p-64", strategy="fsdp_tp", remat="full")
    bare_fits, bare_text = run_plan(model="70b", mesh="tpu-v5p-64", strategy="fsdp_tp", remat="full")
    assert fits == bare_fits
    assert "plan: llama:70b under fsdp_tp" in text
    assert text.split("\n", 1)[1] == bare_text.split("\n", 1)[1]  # the same table below the title


def test_explicit_axis_sizes_have_no_hardware_to_check():
    fits, text = run_plan(model="1b", mesh="fsdp=16,tensor=4")
    assert fits and "fsdp_tp" in text and "no hardware given" in text


def test_a_plan_that_cannot_work_is_refused():
    with pytest.raises(mj.PlanError, match="layers/wk"):
        run_plan(model="7b", mesh="tensor=64")


def test_main_returns_nonzero_when_it_does_not_fit(capsys):
    assert main(["plan", "--model", "70b", "--mesh", "gpu-h100x8"]) == 1
    assert main(["plan", "--model", "1b", "--mesh", "gpu-h100x8"]) == 0


def test_a_bad_model_name_is_one_message_and_exit_status_2(capsys):
    assert main(["plan", "--model", "llama:7bb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'llama:7bb'") and "Did you mean '7b'" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_pipelined_plan_shows_its_schedule_and_stage_bytes():
    _, text = run_plan(model="7b", mesh="pipeline=4,fsdp=2", schedule="interleaved", virtual_stages=2)
    assert "under pp_fsdp" in text
    assert "interleaved: 4 stages x 8 microbatches x 2 virtual stages, 38 ticks, bubble 15.8%" in text
    stages = [line for line in text.splitlines() if line.startswith("stage ") and "GiB" in line]
    assert len(stages) == 4 + 4  # a memory bar and a schedule row per stage
    assert "F0.0" in stages[4] and "B7.1" in text
    _, flat = run_plan(model="7b", mesh="fsdp=2")

    def wq_bytes(table: str) -> str:
        (line,) = [row for row in table.splitlines() if "layers/wq" in row]
        return line.split("│")[-2].strip()

    assert (wq_bytes(flat), wq_bytes(text)) == ("1.00 GiB", "256.00 MiB")  # a quarter of the layers per stage


def test_plan_compile_shows_the_compiled_bytes_and_every_collective_by_mesh_axes():
    _, text = run_plan(model="small", mesh="data=2,fsdp=2,tensor=2", compile=True, seq=128)
    assert "compiled ahead of time on 8 simulated CPU devices" in text
    assert "(predicted parameters + optimizer state 3.10 MiB, 1.00x)" in text.replace("\n", " ")
    rows = [line for line in text.splitlines() if line.startswith("│ all-gather")]
    assert rows and all("fsdp" in row for row in rows)
    _, piped = run_plan(model="tiny8", mesh="pipeline=4,data=2", compile=True, batch=16, seq=32)
    assert any(line.startswith("│ collective-permute") and "pipeline" in line for line in piped.splitlines())
