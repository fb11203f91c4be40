"""Pipeline schedules as data: every schedule passes the checker over many (p, m, v); GPipe and
1F1B idle (p-1)/(m+p-1) of the time, interleaved (p-1)/(v*m+p-1), ZB-H1 less than 1F1B; 1F1B and
ZB-H1 stash at most p microbatches where GPipe stashes m; impossible settings are refused with the
counts that work; the picture and the text show the table."""

import dataclasses

import pytest

from mlsys_jax.parallel.pipeline import (
    ScheduleError,
    Work,
    check_layers,
    forward_only,
    gpipe,
    interleaved,
    make_schedule,
    one_f_one_b,
    zero_bubble,
)

PM = [(p, m) for p in (1, 2, 3, 4, 8) for m in (p, p + 1, 2 * p, 8, 16) if m >= p]


@pytest.mark.parametrize("p, m", PM)
def test_gpipe_and_1f1b_idle_as_the_formula_says_and_1f1b_stashes_p(p, m):
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        schedule.check()
        assert schedule.bubble == pytest.approx((p - 1) / (m + p - 1))
        assert schedule.ticks == 2 * (m + p - 1)
    assert gpipe(p, m).peak_stash == m
    assert one_f_one_b(p, m).peak_stash == min(p, m)


@pytest.mark.parametrize("p, m, v", [(p, m, v) for p in (1, 2, 4) for m in (p, 2 * p, 4 * p) for v in (1, 2, 3, 4)])
def test_interleaving_divides_the_bubble_by_the_virtual_stages(p, m, v):
    schedule = interleaved(p, m, v)
    schedule.check()
    assert schedule.bubble == pytest.approx((p - 1) / (v * m + p - 1))
    assert {w.chunk for row in schedule.grid for w in row if w is not None} == set(range(v * p))


@pytest.mark.parametrize("p, m", [(p, m) for p, m in PM if p > 1])
def test_zero_bubble_idles_less_than_1f1b_with_the_same_stash(p, m):
    zb, base = zero_bubble(p, m), one_f_one_b(p, m)
    zb.check()
    assert zb.bubble < base.bubble
    assert zb.bubble == pytest.approx(2 * (p - 1) / (3 * m + 2 * (p - 1)))
    assert zb.peak_stash == base.peak_stash
    assert {w.kind for row in zb.grid for w in row if w is not None} == {"F", "B", "W"}


def test_the_checker_catches_each_kind_of_broken_table():
    good = one_f_one_b(2, 2)
    grid = [list(row) for row in good.grid]
    swapped = dataclasses.replace(good, grid=tuple(tuple(r) for r in [grid[1], grid[0], *grid[2:]]))
    with pytest.raises(ScheduleError, match="needs F0 of chunk 0 from an earlier tick"):
        swapped.check()
    dropped = dataclasses.replace(good, grid=good.grid[:-1])
    with pytest.raises(ScheduleError, match="missing"):
        dropped.check()
    twice = dataclasses.replace(good, grid=(*good.grid, good.grid[-1]))
    with pytest.raises(ScheduleError, match="runs twice"):
        twice.check()
    moved = [list(r) for r in good.grid]
    moved[0] = [None, Work("F", 0, 0)]
    with pytest.raises(ScheduleError, match="lives on stage 0"):
        dataclasses.replace(good, grid=tuple(tuple(r) for r in moved)).check()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: one_f_one_b(4, 3), "1f1b needs at least as many microbatches as stages: 3 microbatches for 4"),
        (lambda: zero_bubble(4, 2), "zb needs at least as many microbatches as stages"),
        (lambda: interleaved(4, 6, 2), "6 is not a multiple of 4. Fix: --microbatches 4 or 8"),
        (lambda: make_schedule("pipedream", 2, 4), "unknown schedule 'pipedream'"),
        (lambda: make_schedule("1f1b", 2, 4, virtual=2), "applies to the interleaved schedule only"),
        (lambda: check_layers(4, 8), "a pipeline of 8 stages needs at least 8 layers; the model has 4"),
        (lambda: check_layers(6, 4), r"6 layers do not split into 4 stages .* a pipeline axis of \[1, 2, 3, 6\]"),
        (
            lambda: check_layers(8, 2, 3),
            r"2 stages x 3 virtual stages \(6 equal chunks\). Fix: --virtual-stages from \[1, 2, 4\]",
        ),
    ],
)
def test_impossible_settings_are_refused_with_what_works(call, message):
    with pytest.raises(ScheduleError, match=message):
        call()


def test_a_schedule_reads_as_text_and_draws_as_a_gantt_chart(tmp_path):
    text = str(interleaved(2, 4, 2))
    assert text.splitlines()[0] == "interleaved: p=2, m=4, v=2, 18 ticks, bubble 11.1%, peak stash 5 microbatches"
    assert text.splitlines()[1].startswith("stage 0: F0a F1a F0b F1b")
    assert text.splitlines()[2].startswith("stage 1: .   F0a")
    path = tmp_path / "pp.png"
    zero_bubble(4, 8).render(str(path))
    assert path.stat().st_size > 10_000


def test_the_readme_shows_the_schedule_as_printed(repo_root):
    section = (repo_root / "README.md").read_text().split("## Pipeline parallelism", 1)[1]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0]
    assert shown.rstrip("\n") == str(one_f_one_b(4, 8))


@pytest.mark.parametrize("p, m, v", [(4, 8, 1), (4, 8, 2), (2, 6, 3)])
def test_an_evaluation_runs_each_stages_forwards_in_the_schedules_order(p, m, v):
    schedule = interleaved(p, m, v) if v > 1 else one_f_one_b(p, m)
    forwards = forward_only(schedule)

    def column(sch, s):
        return [row[s] for row in sch.grid if row[s] is not None and row[s].kind == "F"]

    for s in range(p):
        assert column(forwards, s) == column(schedule, s)
    assert all(w.kind == "F" for row in forwards.grid for w in row if w is not None)
    assert forwards.ticks < schedule.ticks
