"""The training runtime's parts on their own: settings checked when parsed, the fit check, the
non-finite guard, state fingerprints, the intact-checkpoint fallback, the folder lock and the
one-message errors."""

import errno
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlsys_jax as mj
from mlsys_jax import train
from mlsys_jax.analysis.memory import FitError, check_fit, fit_fix, memory_of, plan_memory
from mlsys_jax.cli import main
from mlsys_jax.mesh import MeshError, abstract_mesh, parse_axis_sizes
from mlsys_jax.meshes import PresetError, load_preset
from mlsys_jax.models import build_model, get_config, llama
from mlsys_jax.models.base import ConfigError
from mlsys_jax.train import integrity
from mlsys_jax.train.checkpoint import Checkpointer, CheckpointError, summarize
from mlsys_jax.train.config import RunConfig, run_settings
from mlsys_jax.train.lock import FolderLock

MODEL = llama.language_model(get_config("tiny", dtype="float32"))


# ---- settings ---------------------------------------------------------------------------------
def test_flat_settings_land_in_their_sections():
    cfg = RunConfig.of(model="tiny", lr=1e-3, ckpt_dir="/tmp/x", batch=8, on_nan="skip")
    assert cfg.model.model == "tiny" and cfg.optimizer.lr == 1e-3 and cfg.checkpoint.ckpt_dir == "/tmp/x"
    assert cfg.data.batch == 8 and cfg.loop.on_nan == "skip" and cfg.get("batch") == 8
    assert RunConfig.of(**cfg.flat()) == cfg
    with pytest.raises(ConfigError, match="no run setting named 'learning_rate'"):
        RunConfig.of(learning_rate=1.0)


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1.0, 0.0])
def test_a_learning_rate_that_cannot_train_is_refused_when_parsed(lr):
    with pytest.raises(ConfigError, match="--lr must be a finite positive number"):
        RunConfig.of(lr=lr)


def test_the_recorded_settings_are_the_ones_the_run_used():
    settings = run_settings(
        RunConfig.of(model="tiny", dtype="float32", remat="full", lr=1e-3, steps=7, strategy="fsdp")
    )
    assert settings["model_config"]["dtype"] == "float32" and settings["model_config"]["remat"] == "full"
    assert settings["lr"] == 1e-3 and settings["steps"] == 7 and settings["strategy"] == "fsdp"
    assert "ckpt_dir" not in settings and "progress" not in settings


def test_mesh_and_preset_defects_are_refused():
    with pytest.raises(MeshError, match="'data' is given twice in 'data=2,data=4'"):
        parse_axis_sizes("data=2,data=4")
    for name in ("../../etc/passwd", "/abs/cpu-8", ".hidden", ""):
        with pytest.raises(PresetError, match="named without a path"):
            load_preset(name)


def test_a_divisibility_error_never_suggests_a_useless_mesh():
    plan = mj.Plan(abstract_mesh({"tensor": 3}), mj.rules("tp"))
    with pytest.raises(mj.PlanError) as err:
        plan.param_shardings(MODEL.specs)
    assert "e.g. 1" not in str(err.value) and "multiple of 3" in str(err.value)


# ---- fit --------------------------------------------------------------------------------------
def test_the_fit_check_counts_state_and_activations_against_the_presets_memory():
    preset = load_preset("cpu-8")
    plan = mj.Plan(abstract_mesh(preset), mj.rules("dp_fsdp_tp"), device=preset.device)
    small = build_model("small")
    opt = train.adamw(train.OptimConfig(), small.specs)
    mem = plan_memory(plan, small, opt, batch=16, seq=128)
    state = train.abstract_state(plan, small.specs, opt)
    shard_bytes = lambda tree: sum(
        np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )
    assert mem.params == shard_bytes(state.params) and mem.opt_state == shard_bytes(state.opt_state)
    assert mem.fits and mem.activations > 0
    longer = plan_memory(plan, small, opt, batch=16, seq=100_000)
    with pytest.raises(FitError, match=r"activations \d.*of 2.00 GiB.*too much.*--seq.*--force"):
        check_fit(longer, "small")
    remat = build_model("small", remat="full")
    with_remat = plan_memory(plan, remat, opt, batch=16, seq=4096).activations
    without = plan_memory(plan, small, opt, batch=16, seq=4096).activations
    assert 0 < with_remat < without
    big = build_model("70b")
    huge = plan_memory(plan, big, train.adamw(train.OptimConfig(), big.specs), batch=16, seq=128)
    with pytest.raises(FitError, match=r"parameters .* GiB \+ gradients .* optimizer state .*shards more"):
        check_fit(huge, "70b")


def test_a_run_that_does_not_fit_is_offered_the_change_that_makes_it_fit_with_the_figure_after():
    cfg = RunConfig.of(model="small", mesh="cpu-8", batch=16, seq=4096)
    mem = memory_of(cfg)
    assert mem.fits is False and mem.hbm is not None and mem.state < mem.hbm  # the activations overflow
    fix = fit_fix(cfg, mem)
    assert fix is not None and fix.memory.fits and fix.memory.total < mem.total
    after = memory_of(RunConfig.of(**{**cfg.flat(), **fix.flags}))
    assert after.total == fix.memory.total  # the figure after is the change's own
    with pytest.raises(FitError) as err:
        check_fit(mem, "small", cfg)
    assert f"Fix: {fix.describe()}" in str(err.value) and "too much" in str(err.value)


def test_the_memory_model_traces_one_tensor_shard_of_the_model():
    small = build_model("small")
    opt = train.adamw(train.OptimConfig(), small.specs)
    whole = plan_memory(mj.Plan(abstract_mesh({"data": 2}), mj.rules("dp")), small, opt, batch=2, seq=1024)
    split = plan_memory(
        mj.Plan(abstract_mesh({"data": 1, "tensor": 2}), mj.rules("dp_tp")), small, opt, batch=1, seq=1024
    )
    # heads and the MLP split in two, the residual stream does not: between a half and the whole
    assert 0.5 * whole.activations < split.activations < 0.9 * whole.activations


# ---- the non-finite guard -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(devices):
    plan = mj.Plan(mj.make_mesh(fsdp=4, tensor=2), mj.rules("fsdp_tp"))
    opt = train.adamw(train.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=10), MODEL.specs)
    rng = np.random.default_rng(0)
    t = rng.integers(0, 384, (8, 17)).astype(np.int32)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:], "mask": np.ones((8, 16), bool)}
    steps = {g: train.make_train_step(MODEL, plan, opt, guard=g, donate=False) for g in ("stop", "skip")}
    put = {k: jax.device_put(v, steps["stop"].batch_shardings[k]) for k, v in batch.items()}
    return plan, opt, steps, put


def poisoned(state):
    """The state with one NaN in a weight: every loss it computes is NaN."""
    wq = state.params["layers"]["wq"].at[0, 0, 0, 0].set(jnp.nan)
    params = {**state.params, "layers": {**state.params["layers"], "wq": wq}}
    return state._replace(params=params)


def test_stop_keeps_the_last_good_state_through_every_step_dispatched_after_a_bad_one(guarded):
    plan, opt, steps, batch = guarded
    good = train.init_state(plan, MODEL.specs, opt)
    bad = poisoned(good)
    after_bad, m = steps["stop"](bad, batch, 0)
    assert not bool(m["finite"]) and not bool(m["applied"]) and int(after_bad.step) == 0
    for a, b in zip(jax.tree.leaves(after_bad.opt_state), jax.tree.leaves(bad.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A finite step dispatched next, numbered as if the bad one had counted, is a no-op too.
    fixed = good._replace(step=after_bad.step)
    later, m2 = steps["stop"](fixed, batch, 1)
    assert bool(m2["finite"]) and not bool(m2["applied"]) and int(later.step) == 0
    for a, b in zip(jax.tree.leaves(later.params), jax.tree.leaves(good.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # In order, it applies.
    applied, m3 = steps["stop"](good, batch, 0)
    assert bool(m3["applied"]) and int(applied.step) == 1


def test_skip_drops_the_update_but_counts_the_step(guarded):
    plan, opt, steps, batch = guarded
    bad = poisoned(train.init_state(plan, MODEL.specs, opt))
    after, m = steps["skip"](bad, batch, 0)
    assert not bool(m["finite"]) and int(after.step) == 1
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(bad.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- fingerprints and the intact-checkpoint fallback --------------------------------------------
def test_a_fingerprint_ignores_placement_and_sees_one_changed_bit(guarded):
    plan, opt, _, _ = guarded
    state = train.init_state(plan, MODEL.specs, opt)
    other = mj.Plan(mj.make_mesh(data=8), mj.rules("dp"))
    moved = jax.device_put(state, train.state_shardings(other, MODEL.specs, opt))
    assert integrity.inspect(moved) == integrity.inspect(state)
    w = state.params["embed"]
    flipped = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(w, jnp.uint32).at[3, 5].add(1), jnp.float32)
    changed = state._replace(params={**state.params, "embed": flipped})
    finite, prints = integrity.inspect(changed)
    assert finite and integrity.mismatches(integrity.inspect(state)[1], prints) == [".params['embed']"]
    assert not integrity.inspect(poisoned(state))[0]


def test_a_step_whose_settings_file_is_missing_is_set_aside_and_the_one_before_restored(guarded, tmp_path):
    plan, opt, _, _ = guarded
    state = train.init_state(plan, MODEL.specs, opt)
    ckpt = Checkpointer(tmp_path, save_every=1)
    for step in (1, 2):
        ckpt.save(step, state._replace(step=jnp.asarray(step, jnp.int32)), {"n": step}, {"run": "a"})
    ckpt.close()
    (tmp_path / "2" / "meta" / "metadata").unlink()
    again = Checkpointer(tmp_path)
    restored, damaged = again.restore_intact(train.abstract_state(plan, MODEL.specs, opt))
    assert restored is not None and restored.step == 1 and restored.data_state == {"n": 1}
    assert [d.step for d in damaged] == [2] and "settings file cannot be read" in damaged[0].reason
    assert damaged[0].moved_to is not None and (damaged[0].moved_to / "state").is_dir()  # kept, not deleted
    assert again.all_steps() == [1]
    # Refusing a checkpoint of other settings is not damage: nothing is set aside for it.
    with pytest.raises(CheckpointError, match="other"):
        again.restore_intact(
            train.abstract_state(plan, MODEL.specs, opt),
            accept=lambda meta: (_ for _ in ()).throw(CheckpointError("other")),
        )
    assert again.all_steps() == [1]
    again.close()


def test_a_disk_error_is_named_by_its_cause_however_deeply_wrapped():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise ValueError("OUT_OF_RANGE: Error writing ... in OCDBT") from inner
    except ValueError as outer:
        assert summarize(outer) == "No space left on device (OSError)"
    assert summarize(RuntimeError("x " * 500), limit=50).endswith("...")


# ---- one writer per folder ----------------------------------------------------------------------
HOLD = (
    "import sys, time; from mlsys_jax.train.lock import FolderLock; lock = FolderLock(sys.argv[1]); lock.acquire('hold'); "
    "print('held', flush=True); time.sleep(600)"
)


def test_a_second_job_is_refused_the_folder_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"in use by another run \\(job pid {holder.pid} on "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with FolderLock(tmp_path) as lock:  # a killed holder's lock does not stick
        assert lock.handle is not None
    FolderLock(tmp_path).acquire()  # and a released one neither


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "data=2,data=4"], "error: mesh axis 'data' is given twice"),
        (["--mesh", "../cpu-8"], "error: mesh preset name '../cpu-8' is not a name"),
        (["--ckpt-dir", "CKPT_FILE/sub"], "error: --ckpt-dir"),
        (["--model", "lama:tiny"], "error: unknown model family 'lama'"),
        (["--mesh", "pipeline=8", "--model", "small"], "error: a pipeline of 8 stages needs at least 8 layers"),
        (["--mesh", "pipeline=3", "--model", "small"], r"error: 4 layers do not split into 3 stages"),
        (
            ["--mesh", "pipeline=2,data=4", "--model", "small", "--schedule", "interleaved", "--virtual-stages", "4"],
            "error: 4 layers do not split into 2 stages x 4 virtual stages",
        ),
        (["--mesh", "pipeline=4,data=2", "--microbatches", "2"], "error: 1f1b needs at least as many microbatches"),
        (
            [
                "--mesh",
                "pipeline=2,data=4",
                "--schedule",
                "interleaved",
                "--virtual-stages",
                "2",
                "--microbatches",
                "3",
            ],
            "error: interleaved needs microbatches in whole groups of the 2 stages",
        ),
        (["--mesh", "pipeline=2,data=4", "--strategy", "dp"], "error: --mesh 'pipeline=2,data=4' has pipeline=2, but"),
        (["--virtual-stages", "2"], "error: --virtual-stages 2 needs a pipeline axis"),
        (
            ["--mesh", "pipeline=2,data=4", "--virtual-stages", "2"],
            "error: --virtual-stages 2 applies to the interleaved schedule only",
        ),
        (
            ["--mesh", "pipeline=2,data=4", "--microbatches", "4", "--batch", "24"],
            "error: global batch 24 cannot be split into 4 microbatch",
        ),
    ],
)
def test_a_user_error_is_one_message_and_exit_status_2(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [a.replace("CKPT_FILE", str(tmp_path / "file")) for a in args]
    assert main(["train", "--ckpt-dir", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1 and "Fix" in err
    with pytest.raises(Exception, match=message.removeprefix("error: ")[:20].replace("(", r"\(")):
        main(["train", "--ckpt-dir", str(tmp_path / "run"), *args, "--debug"])


def test_the_rest_of_a_cpu_mesh_without_a_device_count_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlsys_jax.cli",
            "train",
            "--mesh",
            "fsdp=-1",
            "--model",
            "tiny",
            "--ckpt-dir",
            str(tmp_path / "run"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: --mesh 'fsdp=-1': fsdp=-1 ('the rest') came to 1 device")
    assert "--simulate-devices" in out.stderr and time.perf_counter() - t0 < 120


def test_stop_requests_outside_the_main_thread_catch_nothing_and_break_nothing():
    import threading

    from mlsys_jax.train.preemption import StopRequests

    seen = []

    def body():
        with StopRequests() as stops:
            seen.append(stops.requested(1))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=60)
    assert seen == [False] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "sizes, strategy", [({"fsdp": 4, "tensor": 2}, "fsdp_tp"), ({"data": 2, "fsdp": 4}, "dp_fsdp")]
)
def test_the_guard_moves_no_more_bytes_between_devices(devices, sizes, strategy):
    from mlsys_jax.analysis import collectives

    plan = mj.Plan(mj.make_mesh(sizes), mj.rules(strategy))
    opt = train.adamw(train.OptimConfig(), MODEL.specs)

    def moved(guard):
        found = collectives(train.make_train_step(MODEL, plan, opt, guard=guard).lower(8, 16).compile())
        gathered = sum(c.payload_bytes * c.count for c in found if c.kind == "all-gather")
        return gathered, sum(c.total_traffic_bytes for c in found)

    gathered, traffic = moved(None)
    for guard in ("stop", "skip"):
        with_guard = moved(guard)
        assert with_guard[0] <= gathered and with_guard[1] <= traffic, guard
