"""linear_cross_entropy: every backend meets the full-logits reference, values and gradients.

Shapes are deliberately off the block sizes (50 tokens, vocab 300 with 16 x 128 tiles) so ragged
token and vocabulary edges are exercised. Pallas backends run in interpret mode here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mlsys_jax.kernels.cross_entropy import (
    LINEAR_CROSS_ENTROPY,
    LossBlocks,
    choose,
    linear_cross_entropy,
)
from mlsys_jax.kernels.dispatch import KernelUnavailable

IGNORE = -100
BLOCKS = LossBlocks(block_tokens=16, block_vocab=128)
FUSED = ("chunked", "pallas_triton", "pallas_tpu")


def make_inputs(shape=(50,), d=32, vocab=300, dtype=jnp.float32, seed=0):
    kh, kw, kl = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(kh, (*shape, d), jnp.float32).astype(dtype)
    weight = (jax.random.normal(kw, (d, vocab), jnp.float32) * d**-0.5 * 3).astype(dtype)
    labels = jax.random.randint(kl, shape, 0, vocab)
    flat = labels.reshape(-1).at[jnp.array([3, 7, 8])].set(IGNORE)
    return hidden, weight, flat.reshape(shape)


def loss_and_grads(implementation, hidden, weight, labels, **kw):
    """Per-token losses and the gradients of their sum wrt (hidden, weight)."""

    def total(h, w, lab):
        per_token = linear_cross_entropy(h, w, lab, implementation=implementation, **kw)
        return per_token.sum(), per_token

    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))
    (_, per_token), grads = step(hidden, weight, labels)
    return per_token, grads[0], grads[1]


@functools.cache
def fp32_case(implementation):
    hidden, weight, labels = make_inputs()
    out = loss_and_grads(implementation, hidden, weight, labels, z_loss=1e-2, blocks=BLOCKS)
    return (hidden, weight, labels), out


def assert_close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=tol, atol=tol)


def test_reference_equals_log_softmax_cross_entropy_with_z_loss():
    hidden, weight, labels = make_inputs(shape=(10,), vocab=40)
    logits = hidden @ weight
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    expected = jnp.where(labels == IGNORE, 0.0, lse - picked + 0.1 * lse**2)
    got = linear_cross_entropy(hidden, weight, labels, z_loss=0.1, implementation="xla")
    assert got.dtype == jnp.float32
    assert_close(got, expected, 1e-5)


@pytest.mark.parametrize("implementation", FUSED)
def test_fused_backend_matches_reference_fp32_on_ragged_shapes(implementation):
    _, (loss, dh, dw) = fp32_case(implementation)
    _, (ref_loss, ref_dh, ref_dw) = fp32_case("xla")
    assert loss.shape == (50,) and dh.shape == (50, 32) and dw.shape == (32, 300)
    assert_close(loss, ref_loss, 2e-5)
    assert_close(dh, ref_dh, 2e-5)
    assert_close(dw, ref_dw, 2e-5)


@pytest.mark.parametrize("implementation", ("xla", *FUSED))
def test_ignored_tokens_have_zero_loss_and_zero_gradient(implementation):
    (_, _, labels), (loss, dh, _) = fp32_case(implementation)
    ignored = np.asarray(labels == IGNORE)
    assert ignored.sum() == 3
    assert np.all(np.asarray(loss)[ignored] == 0.0)
    assert np.all(np.asarray(dh)[ignored] == 0.0)
    assert np.all(np.asarray(loss)[~ignored] > 0.0)


@functools.cache
def bf16_reference():
    """The fp32 reference evaluated from the bf16 test inputs."""
    hidden, weight, labels = make_inputs(shape=(2, 24), dtype=jnp.bfloat16, seed=1)
    return loss_and_grads("xla", hidden.astype(jnp.float32), weight.astype(jnp.float32), labels)


@pytest.mark.parametrize("implementation", FUSED)
def test_bf16_with_leading_batch_and_sequence_dims_matches_reference_loosely(implementation):
    hidden, weight, labels = make_inputs(shape=(2, 24), dtype=jnp.bfloat16, seed=1)
    loss, dh, dw = loss_and_grads(implementation, hidden, weight, labels, blocks=BLOCKS)
    ref_loss, ref_dh, ref_dw = bf16_reference()
    assert loss.shape == (2, 24) and loss.dtype == jnp.float32
    assert dh.shape == hidden.shape and dh.dtype == jnp.bfloat16
    assert dw.shape == weight.shape and dw.dtype == jnp.bfloat16
    assert_close(loss, ref_loss, 2e-2)
    assert_close(dh, ref_dh, 3e-2)
    assert_close(dw, ref_dw, 3e-2)


def test_default_blocks_and_other_ignore_index_match_reference():
    hidden, weight, labels = make_inputs(shape=(3, 7), vocab=130)
    labels = jnp.where(labels == IGNORE, 0, labels).at[0, 0].set(-1)
    run = jax.jit(linear_cross_entropy, static_argnames=("ignore_index", "implementation"))
    got = run(hidden, weight, labels, ignore_index=-1)
    expected = run(hidden, weight, labels, ignore_index=-1, implementation="xla")
    assert got[0, 0] == 0.0
    assert_close(got, expected, 1e-5)


def test_label_outside_vocabulary_counts_as_logit_zero_in_every_backend():
    # Not checkable at trace time: such a label behaves as if its logit were 0 (loss = lse).
    hidden, weight, labels = make_inputs(shape=(20,), vocab=50)
    labels = labels.at[0].set(50).at[1].set(-5)
    lse = jax.nn.logsumexp(hidden @ weight, axis=-1)
    run = jax.jit(linear_cross_entropy, static_argnames=("implementation", "blocks"))
    for implementation in ("xla", "chunked"):
        got = run(hidden, weight, labels, implementation=implementation, blocks=LossBlocks(8, 16))
        assert_close(got[:2], lse[:2], 1e-5)


# --- tensor parallelism over the vocabulary ------------------------------------------------------


@pytest.mark.parametrize("implementation", ("xla", "chunked", "pallas_tpu"))
def test_vocab_parallel_in_shard_map_matches_unsharded_reference(devices, implementation):
    mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "tensor"))
    hidden, weight, labels = make_inputs(shape=(64,), vocab=256, seed=2)
    ref = loss_and_grads("xla", hidden, weight, labels, z_loss=1e-2)

    def local(h, w, lab):
        return linear_cross_entropy(
            h, w, lab, z_loss=1e-2, implementation=implementation, blocks=BLOCKS, vocab_axis="tensor"
        )

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P(None, "tensor"), P("data")), out_specs=P("data")
    )  # check_vma=True, the default

    def total(h, w):
        per_token = sharded(h, w, labels)
        return per_token.sum(), per_token

    (_, loss), (dh, dw) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(hidden, weight)
    assert_close(loss, ref[0], 1e-4)
    assert_close(dh, ref[1], 1e-5)
    assert_close(dw, ref[2], 1e-5)


# --- dispatch and errors ---------------------------------------------------------------------------


def test_dispatch_picks_chunked_on_cpu_and_pallas_runs_interpreted():
    hidden, weight, _ = make_inputs(shape=(4,), vocab=16)
    auto = choose(hidden, weight)
    assert auto.backend.name == "chunked" and not auto.interpret
    assert set(LINEAR_CROSS_ENTROPY.names()) == {"xla", "chunked", "pallas_triton", "pallas_tpu"}
    pallas = choose(hidden, weight, implementation="pallas")
    assert pallas.backend.is_pallas and pallas.interpret


def test_unknown_implementation_and_integer_hidden_are_refused_with_reasons():
    hidden, weight, labels = make_inputs(shape=(4,), vocab=16)
    with pytest.raises(KernelUnavailable, match="unknown implementation 'cuda'"):
        linear_cross_entropy(hidden, weight, labels, implementation="cuda")
    with pytest.raises(ValueError, match="hidden must be float32, bfloat16 or float16"):
        linear_cross_entropy(hidden.astype(jnp.int32), weight, labels)


def test_weight_of_wrong_shape_raises_naming_the_fix():
    hidden, weight, labels = make_inputs(shape=(4,), vocab=16)
    with pytest.raises(ValueError, match=r"weight \(16, 32\) must be \(D, V\) with D = hidden.shape\[-1\] = 32"):
        linear_cross_entropy(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="labels .* must have hidden's leading shape"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="must share a dtype"):
        linear_cross_entropy(hidden, weight.astype(jnp.bfloat16), labels)
    with pytest.raises(ValueError, match="z_loss must be a non-negative"):
        linear_cross_entropy(hidden, weight, labels, z_loss=-1.0)


def test_pallas_blocks_that_are_not_powers_of_two_are_refused():
    hidden, weight, labels = make_inputs(shape=(4,), vocab=16)
    with pytest.raises(ValueError, match="block_tokens=24 must be a power of two"):
        linear_cross_entropy(
            hidden, weight, labels, implementation="pallas_triton", blocks=LossBlocks(block_tokens=24, block_vocab=128)
        )
    with pytest.raises(ValueError, match="block_vocab=64 must be a multiple of 128"):
        linear_cross_entropy(
            hidden, weight, labels, implementation="pallas_tpu", blocks=LossBlocks(block_tokens=16, block_vocab=64)
        )


# --- memory ------------------------------------------------------------------------------------------


def compiled_temp_bytes(implementation, tokens, d, vocab, blocks=None):
    hidden = jax.ShapeDtypeStruct((tokens, d), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((d, vocab), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def total(h, w, lab):
        return linear_cross_entropy(h, w, lab, implementation=implementation, blocks=blocks).sum()

    step = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))
    mem = step.lower(hidden, weight, labels).compile().memory_analysis()
    assert mem is not None
    return mem.temp_size_in_bytes


def test_chunked_backward_needs_under_a_quarter_of_the_unfused_temp_memory():
    tokens, d, vocab = 512, 128, 8192
    unfused = compiled_temp_bytes("xla", tokens, d, vocab)
    fused = compiled_temp_bytes("chunked", tokens, d, vocab, LossBlocks(128, 1024))
    assert unfused > tokens * vocab * 4  # the reference holds at least the fp32 logits
    assert fused < unfused / 4, (fused, unfused)
