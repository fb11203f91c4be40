"""``comm.models``: the single-server cost, two-level links, crossovers and the alpha-beta fit."""

from __future__ import annotations

import pytest

from mlsys_jax.comm import models
from mlsys_jax.comm.models import AlphaBeta


@pytest.mark.parametrize("n", [2, 4, 8])
def test_single_server_link_carries_n_times_the_gradients_each_way(n):
    v = 1000.0
    c = models.cost("parameter_server_single", n, v)
    assert (c.steps, c.bytes_per_device) == (2 * n, pytest.approx(2 * n * v))  # n V in, then n V out
    on_worker = models.cost("parameter_server_single", n, v, dedicated_server=False)
    assert (on_worker.steps, on_worker.bytes_per_device) == (2 * (n - 1), pytest.approx(2 * (n - 1) * v))
    ring = models.cost("ring", n, v)
    assert c.bytes_per_device / ring.bytes_per_device == pytest.approx(n * n / (n - 1))


def test_single_server_is_slower_than_the_ring_at_every_size_on_one_link():
    link = AlphaBeta(1e-5, 1e-9)
    x = models.crossover("ring", "parameter_server_single", 8, link)
    assert (x.nbytes, x.below, x.above) == (None, "ring", "ring")
    tie = models.crossover("ring", "parameter_server", 8, link)  # same steps and bytes
    assert (tie.nbytes, tie.below, tie.above) == (None, "tie", "tie")


def test_crossover_is_where_two_lines_meet():
    # Halving-doubling: fewer steps, same bytes on one link -> faster everywhere.
    link = AlphaBeta(1e-5, 1e-9)
    x = models.crossover("halving_doubling", "ring", 8, link)
    assert (x.nbytes, x.above) == (None, "halving_doubling")
    # Single server on worker 0 over a slow inner and fast outer link: its few steps win small
    # messages, the ring's fewer bytes win large ones.
    inner, outer = AlphaBeta(3e-3, 1e-9), AlphaBeta(2e-4, 1e-9)
    x = models.crossover("ring", "parameter_server_single", 8, inner, outer, node_size=4, dedicated_server=False)
    assert x.below == "parameter_server_single" and x.above == "ring" and x.nbytes is not None
    at = x.nbytes
    t = lambda name, v: models.time_on(models.cost(name, 8, v, node_size=4, dedicated_server=False), inner, outer)
    assert t("ring", at) == pytest.approx(t("parameter_server_single", at))
    assert t("ring", 2 * at) < t("parameter_server_single", 2 * at)
    assert t("ring", at / 2) > t("parameter_server_single", at / 2)


def test_steps_are_charged_to_the_link_their_messages_cross():
    v = 1000.0
    # 8 devices as 2 nodes of 4: a ring has both kinds of message in every step.
    ring = models.cost("ring", 8, v, node_size=4)
    assert [(p.link, p.steps) for p in ring.phases] == [("mixed", 14)]
    # Halving-doubling: distance 4 crosses (first halving: V/2, last doubling: V/2), 2 and 1 stay.
    hd = models.cost("halving_doubling", 8, v, node_size=4)
    assert (hd.on("outer").steps, hd.on("outer").bytes_per_device) == (2, pytest.approx(v))
    assert (hd.on("inner").steps, hd.on("inner").bytes_per_device) == (4, pytest.approx(0.75 * v))
    # Hierarchical with the node as its inner axis: only the V/4 shard's outer ring crosses.
    h = models.cost("hierarchical", 8, v, inner=4, node_size=4)
    assert (h.on("outer").steps, h.on("outer").bytes_per_device) == (2, pytest.approx(v / 4))
    assert (h.on("inner").steps, h.on("inner").bytes_per_device) == (6, pytest.approx(1.5 * v))
    # A single server on worker 0: its node's 3 workers inside, the other 4 across.
    s = models.cost("parameter_server_single", 8, v, node_size=4, dedicated_server=False)
    assert (s.on("inner").steps, s.on("outer").steps) == (6, 8)
    # Totals are unchanged by the split.
    flat = models.cost("halving_doubling", 8, v)
    assert (hd.steps, hd.bytes_per_device) == (flat.steps, pytest.approx(flat.bytes_per_device))
    assert [p.link for p in flat.phases] == ["inner"]


def test_time_on_prices_each_phase_on_its_link_and_mixed_on_the_slower():
    inner, outer = AlphaBeta(1e-6, 1e-10), AlphaBeta(1e-5, 1e-9)
    h = models.cost("hierarchical", 8, 4000, inner=4, node_size=4)
    expected = 6 * 1e-6 + 6000 * 1e-10 + 2 * 1e-5 + 1000 * 1e-9
    assert models.time_on(h, inner, outer) == pytest.approx(expected)
    ring = models.cost("ring", 8, 4000, node_size=4)
    assert models.time_on(ring, inner, outer) == pytest.approx(models.time_s(ring, 1e-5, 1e-9))
    # A mixed step is as slow as its slower link, whichever that is.
    assert models.time_on(ring, outer, inner) == pytest.approx(models.time_s(ring, 1e-5, 1e-9))
    # A figure of its own for mixed steps replaces the slower link there, and only there.
    slow = AlphaBeta(1e-3, 1e-8)
    assert models.time_on(ring, inner, outer, slow) == pytest.approx(models.time_s(ring, 1e-3, 1e-8))
    assert models.time_on(h, inner, outer, slow) == pytest.approx(expected)
    # One link for all when outer is not given: the plain alpha-beta time.
    assert models.time_on(h, inner) == pytest.approx(models.time_s(h, 1e-6, 1e-10))


def test_fit_alpha_beta_recovers_a_line_and_never_goes_negative():
    sizes = [1e3, 1e5, 1e6, 4e6]
    ab = models.fit_alpha_beta(sizes, [1e-4 + s * 2e-9 for s in sizes])
    assert ab.alpha == pytest.approx(1e-4) and ab.beta == pytest.approx(2e-9)
    flat = models.fit_alpha_beta(sizes, [3e-4, 2.9e-4, 2.8e-4, 2.7e-4])  # falls with size: beta would be < 0
    assert flat.beta == 0 and flat.alpha == pytest.approx(2.85e-4, rel=0.05)
    with pytest.raises(ValueError):
        models.fit_alpha_beta([1e3], [0.0])


def test_alpha_beta_of_a_preset_link():
    from mlsys_jax.meshes import load_preset

    link = load_preset("gpu-h100x8").link_of("fsdp")
    ab = AlphaBeta.of_link(link)
    assert ab.alpha == link.latency and ab.beta == pytest.approx(1 / link.bandwidth)
    with pytest.raises(ValueError):
        AlphaBeta(-1.0, 0.0)
