"""Pipeline parallelism on the ``pipeline`` mesh axis: schedules as data (GPipe, 1F1B,
interleaved 1F1B, ZB-H1), their checker, bubble and stash figures, and their pictures."""

from mlsys_jax.parallel.pipeline.schedule import (
    SCHEDULES,
    Schedule,
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

__all__ = [
    "SCHEDULES",
    "Schedule",
    "ScheduleError",
    "Work",
    "check_layers",
    "forward_only",
    "gpipe",
    "interleaved",
    "make_schedule",
    "one_f_one_b",
    "zero_bubble",
]
