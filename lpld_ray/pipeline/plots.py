"""The report's training curve (loss and test top-1 against epoch) and the grid's accuracy-against-storage plot."""

from __future__ import annotations

import io

from lpld_ray.pipeline.history import read_history
from lpld_ray.pipeline.student import STUDENT_SHARD
from lpld_ray.pipeline.teacher import TEACHER_SHARD
from lpld_ray.store.layout import REPORT_STAGE, STUDENT_STAGE, TEACHER_STAGE
from lpld_ray.store.storage import Store

CURVE_OBJECT = f"{REPORT_STAGE}/training_curve.png"
CURVE_DPI = 100


def training_histories(store: Store, teacher_given: bool) -> dict[str, list[dict]]:
    """The committed per-epoch histories by model: the student's, and the teacher's unless its weights were given
    (then none was trained in the run). Models without a history (not trained yet, older shards) are left out."""
    found = {"student": read_history(store, STUDENT_STAGE, STUDENT_SHARD)}
    if not teacher_given:
        found["teacher"] = read_history(store, TEACHER_STAGE, TEACHER_SHARD)
    return {label: history for label, history in found.items() if history}


def training_curve_png(histories: dict[str, list[dict]]) -> bytes:
    """PNG bytes of two panels, training loss and test top-1 (%) against epoch, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: only the report stage draws
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=CURVE_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global state
    loss_ax, top1_ax = fig.subplots(1, 2)
    for label, history in histories.items():
        loss_ax.plot([r["epoch"] for r in history], [r["loss"] for r in history], label=label)
        evaluated = [r for r in history if r.get("test_top1") is not None]
        top1_ax.plot([r["epoch"] for r in evaluated], [100 * r["test_top1"] for r in evaluated], marker="o",
                     markersize=3, label=label)
    for ax, title in ((loss_ax, "training loss"), (top1_ax, "test top-1 (%)")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_training_curve(store: Store, histories: dict[str, list[dict]]) -> str | None:
    """Write ``report/training_curve.png`` when some model has a history (else remove an earlier one); returns its
    URI, or None."""
    if not histories:
        store.delete(CURVE_OBJECT)  # a curve of an earlier report would no longer match
        return None
    store.write_bytes(CURVE_OBJECT, training_curve_png(histories))
    return store.uri(CURVE_OBJECT)


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats with as little storage or less (higher top-1), by storage: the line drawn."""
    best: list[tuple[float, float, str]] = []
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if not best or point[1] > best[-1][1]:
            best.append(point)
    return best


def accuracy_storage_png(lines: dict[str, list[tuple[float, float, str]]]) -> bytes:
    """PNG bytes of student top-1 (%) against total storage (images + labels, bytes, log scale), each point
    (storage, top-1, name) named, one line per key (grid.py: image source and IPC) through its best points: the
    LPLD paper's Figure 1 for a grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=CURVE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points in sorted(lines.items()):
        best = frontier(points)
        drawn = ax.plot([p[0] for p in best], [p[1] for p in best], marker="o", label=label)[0]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, color=drawn.get_color())
        for x, y, name in points:
            ax.annotate(name, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("storage: images + labels (bytes, log scale)")
    ax.set_ylabel("student test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
