"""RMSNorm and LayerNorm: every backend meets the jnp reference, forward and every gradient.

The Pallas backends run interpreted on CPU, so arrays are small and blocks are 8 rows, which
leaves row counts that are not a multiple of the block (15, 40, 7 and 12 rows).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlsys_jax.kernels import norms
from mlsys_jax.kernels.dispatch import KernelUnavailable
from mlsys_jax.kernels.norms import NormBlocks
from mlsys_jax.kernels.norms import kernel as norms_pallas

BLOCKS = NormBlocks(block_rows=8)
TIGHT: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


def _inputs(shape, dtype=jnp.float32, seed=0):
    kx, kw, kb, kdy = jax.random.split(jax.random.PRNGKey(seed), 4)
    d = shape[-1]
    x = (2.0 * jax.random.normal(kx, shape) + 0.5).astype(dtype)
    weight = (1.0 + 0.2 * jax.random.normal(kw, (d,))).astype(dtype)
    bias = (0.2 * jax.random.normal(kb, (d,))).astype(dtype)
    dy = jax.random.normal(kdy, shape).astype(dtype)
    return x, weight, bias, dy


def _value_and_grads(fn, args, dy):
    """fn(*args) and the gradients of <fn(*args), dy>, compiled as one program (fewer compiles)."""

    def run(args, dy):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(dy)

    return jax.jit(run)(args, dy)


def _ops(implementation, blocks=BLOCKS):
    """(name, kernel, reference, uses_bias) of both norms for one backend."""
    return [
        (
            "rms",
            lambda x, w: norms.rms_norm(x, w, implementation=implementation, blocks=blocks),
            norms.rms_norm_reference,
            False,
        ),
        (
            "layer",
            lambda x, w, b: norms.layer_norm(x, w, b, implementation=implementation, blocks=blocks),
            norms.layer_norm_reference,
            True,
        ),
    ]


def _assert_matches(implementation, shape, dtype, tol, blocks=BLOCKS):
    x, weight, bias, dy = _inputs(shape, dtype)
    for name, kernel, reference, uses_bias in _ops(implementation, blocks):
        args = (x, weight, bias) if uses_bias else (x, weight)
        y, grads = _value_and_grads(kernel, args, dy)
        y_ref, grads_ref = _value_and_grads(reference, args, dy)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_allclose(
            np.asarray(y, np.float32), np.asarray(y_ref, np.float32), err_msg=f"{name} forward", **tol
        )
        for arg_name, g, g_ref, a in zip(("dx", "dweight", "dbias"), grads, grads_ref, args):
            assert g.dtype == a.dtype and g.shape == a.shape, f"{name} {arg_name}"
            np.testing.assert_allclose(
                np.asarray(g, np.float32), np.asarray(g_ref, np.float32), err_msg=f"{name} {arg_name}", **tol
            )


# --- numerics of every backend --------------------------------------------------------------------


def test_xla_matches_reference_forward_and_grads():
    _assert_matches("xla", (3, 5, 64), jnp.float32, TIGHT)


@pytest.mark.parametrize("shape", [(3, 5, 64), (40, 128), (5, 96)])
def test_pallas_triton_matches_reference_forward_and_grads(shape):
    # (5, 96): a feature dim that is no power of two is padded and masked out of the statistics.
    _assert_matches("pallas_triton", shape, jnp.float32, TIGHT)


def test_pallas_tpu_matches_reference_forward_and_grads():
    # TPU needs the feature dim in whole 128-lane rows (see the explained refusal below).
    _assert_matches("pallas_tpu", (3, 5, 128), jnp.float32, TIGHT)


@pytest.mark.parametrize(
    "implementation, dtype",
    [
        ("pallas_triton", jnp.bfloat16),
        ("pallas_triton", jnp.float16),
        ("pallas_tpu", jnp.bfloat16),
    ],
)
def test_low_precision_matches_reference_loosely(implementation, dtype):
    _assert_matches(implementation, (12, 128), dtype, {"rtol": 3e-2, "atol": 3e-2})


def test_weight_grad_is_summed_over_all_rows():
    # With dy = 1 the RMSNorm weight grad is sum over rows of x * rstd, for every feature.
    x, weight, _, _ = _inputs((40, 128))
    rstd = 1.0 / np.sqrt(np.mean(np.asarray(x) ** 2, axis=-1, keepdims=True) + 1e-6)
    expected = np.sum(np.asarray(x) * rstd, axis=0)
    for implementation in ("xla", "pallas_triton"):
        _, (_, dweight) = _value_and_grads(
            lambda x, w, i=implementation: norms.rms_norm(x, w, implementation=i, blocks=BLOCKS),
            (x, weight),
            jnp.ones_like(x),
        )
        np.testing.assert_allclose(dweight, expected, rtol=1e-5, atol=1e-4, err_msg=implementation)


def test_weight_grad_is_accumulated_in_fp32_and_returned_in_weight_dtype():
    # 512 rows of bf16 contributions: a bf16 running sum would drift far past this tolerance.
    x = jnp.full((512, 128), 1.0, jnp.bfloat16)
    weight = jnp.ones((128,), jnp.bfloat16)
    _, (_, dweight) = _value_and_grads(
        lambda x, w: norms.rms_norm(x, w, implementation="pallas_triton", blocks=NormBlocks(64)),
        (x, weight),
        jnp.full_like(x, 1.0 + 2.0**-7),
    )
    assert dweight.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dweight, np.float32), 512 * (1.0 + 2.0**-7), rtol=4e-3)


@pytest.mark.parametrize("lowering", [norms_pallas.TRITON, norms_pallas.TPU])
def test_backward_walks_several_tiles_per_program(lowering):
    # 40 rows in tiles of 8 with at most 2 programs: 3 tiles each, the last 8 rows padding.
    x, weight, bias, dy = _inputs((40, 128), seed=3)
    opts = norms_pallas.NormKernelOptions(
        norm="layer", eps=1e-5, blocks=BLOCKS, lowering=lowering, interpret=True, max_programs=2
    )
    assert norms_pallas.backward_grid(40, opts) == (2, 3)
    _, mean, rstd = norms_pallas.norm_forward(x, weight, bias, opts)
    dx, dweight, dbias = norms_pallas.norm_backward(x, weight, mean, rstd, dy, opts)
    assert dbias is not None
    _, (dx_ref, dweight_ref, dbias_ref) = _value_and_grads(norms.layer_norm_reference, (x, weight, bias), dy)
    np.testing.assert_allclose(dx, dx_ref, **TIGHT)
    np.testing.assert_allclose(dweight, dweight_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-5, atol=1e-4)


# --- dispatch -------------------------------------------------------------------------------------


def test_auto_dispatch_on_cpu_runs_xla():
    x, weight, bias, _ = _inputs((4, 64))
    for op in ("rms_norm", "layer_norm"):
        choice = norms.choose(op, x)
        assert (choice.backend.name, choice.interpret) == ("xla", False)
    np.testing.assert_allclose(norms.layer_norm(x, weight, bias), norms.layer_norm_reference(x, weight, bias), **TIGHT)


def test_pallas_on_cpu_runs_an_interpreted_kernel():
    x, weight, _, _ = _inputs((2, 8, 128))
    choice = norms.choose("rms_norm", x, "pallas")
    assert choice.backend.is_pallas and choice.interpret
    np.testing.assert_allclose(
        norms.rms_norm(x, weight, implementation="pallas", blocks=BLOCKS), norms.rms_norm_reference(x, weight), **TIGHT
    )


def test_pallas_tpu_explains_why_it_cannot_serve():
    x64 = jnp.zeros((4, 64))
    with pytest.raises(KernelUnavailable, match="multiple of 128"):
        norms.choose("rms_norm", x64, "pallas_tpu")
    with pytest.raises(KernelUnavailable, match="float16"):
        norms.choose("layer_norm", jnp.zeros((4, 128), jnp.float16), "pallas_tpu")


# --- errors ---------------------------------------------------------------------------------------


def test_weight_of_wrong_shape_is_rejected_with_a_fix():
    x, weight, bias, _ = _inputs((4, 64))
    with pytest.raises(ValueError, match=r"weight must have shape \(D,\) = \(64,\).*got \(32,\).*Fix"):
        norms.rms_norm(x, weight[:32])
    with pytest.raises(ValueError, match=r"weight must have shape \(D,\) = \(64,\).*got \(1, 64\)"):
        norms.layer_norm(x, weight[None], bias, implementation="pallas_triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(D,\) = \(64,\)"):
        norms.layer_norm(x, weight, bias[:-1])


def test_blocks_that_break_a_lowerings_tiling_rules_are_rejected():
    x, weight, _, _ = _inputs((16, 128))
    with pytest.raises(ValueError, match="power of two.*Fix: use 8 or 16"):
        norms.rms_norm(x, weight, implementation="pallas_triton", blocks=NormBlocks(12))
    with pytest.raises(ValueError, match="multiple of 8 rows.*Fix: use 8"):
        norms.rms_norm(x, weight, implementation="pallas_tpu", blocks=NormBlocks(12))
