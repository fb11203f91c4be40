"""A schedule for people: a text table for terminals and a Gantt chart (stages x ticks) with
forward, backward and weight-gradient work in their own colours, microbatch numbers in the cells
and the bubble shaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlsys_jax.parallel.pipeline.schedule import Schedule, Work

COLOURS = {"F": "#4c8bd6", "B": "#4caf6e", "W": "#e59a3c"}
CHUNK_MARKS = "abcdefghijklmnopqrstuvwxyz"


def label(schedule: Schedule, work: Work) -> str:
    """``F3``, or ``F3b`` when a device holds several chunks (b: its second)."""
    mark = CHUNK_MARKS[schedule.local_chunk(work.chunk)] if schedule.virtual > 1 else ""
    return f"{work.kind}{work.microbatch}{mark}"


def title(schedule: Schedule) -> str:
    virtual = f", v={schedule.virtual}" if schedule.virtual > 1 else ""
    return (
        f"{schedule.name}: p={schedule.stages}, m={schedule.microbatches}{virtual}, {schedule.ticks} ticks, "
        f"bubble {schedule.bubble:.1%}, peak stash {schedule.peak_stash} microbatches"
    )


def text(schedule: Schedule) -> str:
    """One line per stage, one column per tick (``.`` idle)."""
    width = max((len(label(schedule, w)) for row in schedule.grid for w in row if w is not None), default=1)
    lines = [title(schedule)]
    for stage in range(schedule.stages):
        cells = [label(schedule, w) if (w := row[stage]) is not None else "." for row in schedule.grid]
        lines.append(f"stage {stage}: " + " ".join(c.ljust(width) for c in cells).rstrip())
    return "\n".join(lines)


def draw(schedule: Schedule, path: str) -> None:
    """Save the Gantt chart to ``path`` (any format matplotlib writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    ticks, stages = schedule.ticks, schedule.stages
    fig, ax = plt.subplots(figsize=(min(max(6.0, ticks * 0.32), 40.0), 0.55 * stages + 1.6))
    for tick, row in enumerate(schedule.grid):
        for stage, work in enumerate(row):
            y = stages - 1 - stage
            if work is None:
                ax.add_patch(
                    Rectangle((tick, y), 1, 1, facecolor="#eeeeee", edgecolor="#cccccc", hatch="//", linewidth=0.3)
                )
                continue
            ax.add_patch(Rectangle((tick, y), 1, 1, facecolor=COLOURS[work.kind], edgecolor="white", linewidth=0.8))
            ax.text(tick + 0.5, y + 0.5, label(schedule, work)[1:], ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(0, ticks)
    ax.set_ylim(0, stages)
    ax.set_yticks([stages - 0.5 - s for s in range(stages)], [f"stage {s}" for s in range(stages)])
    ax.set_xlabel("tick")
    kinds = ("F", "B", "W") if schedule.split_backward else ("F", "B")
    names = {
        "F": "forward",
        "B": "backward (input grad)" if schedule.split_backward else "backward",
        "W": "weight grad",
    }
    handles = [Patch(facecolor=COLOURS[k], label=names[k]) for k in kinds]
    handles.append(Patch(facecolor="#eeeeee", edgecolor="#cccccc", hatch="//", label="bubble"))
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(handles), fontsize=8, frameon=False
    )
    ax.set_title(title(schedule), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
