"""report/report.md: the run's report for a person, with the summary table, the contact sheet and the training curve."""

from __future__ import annotations

from lpld_ray.pipeline.plots import CURVE_OBJECT, write_training_curve
from lpld_ray.pipeline.sheet import SHEET_CLASSES, SHEET_OBJECT
from lpld_ray.store.layout import REPORT_STAGE
from lpld_ray.store.storage import Store

REPORT_MD_OBJECT = f"{REPORT_STAGE}/report.md"


def percent(value: float | None) -> str:
    """A top-1 fraction as a percentage, or n/a."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def size(n: int) -> str:
    """Bytes exactly, and in KiB/MiB/GiB beside them."""
    scaled, units = n / 1024, ["KiB", "MiB", "GiB"]
    while scaled >= 1024 and len(units) > 1:
        scaled, units = scaled / 1024, units[1:]
    return f"{n:,} B ({scaled:.1f} {units[0]})"


def ratio(value: float | None) -> str:
    """How many times smaller than the full pool, or n/a."""
    return "n/a" if value is None else f"1/{value:,.1f}"


def duration(seconds: float) -> str:
    """Seconds, with minutes beside them from a minute on."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds:.1f} s ({int(seconds // 60)} min {seconds % 60:.0f} s)"


def summary_table(report: dict) -> list[str]:
    """The summary table's lines: accuracy, IPC, k, method, and storage in the paper's terms and as files."""
    rows = [
        ("Teacher test top-1", percent(report["teacher_top1"])),
        ("Student test top-1", percent(report["student_top1"])),
        ("Images per class (IPC, `recover.ipc`)", str(report["ipc"])),
        ("k (`relabel.compression`)", f"{report['compression']:g}"),
        ("Method (`recover.batching` / `recover.source`)", f"{report['batching']} / {report.get('source', 'n/a')}"),
        ("Student epochs", str(report["epochs"])),
        ("Top-k logits kept (`relabel.topk`)", "all" if report.get("topk") is None else str(report["topk"])),
        ("Label bytes, paper's terms (logits + class indices + augmentation params)", size(report["label_bytes"])),
        ("Label bytes: soft-label logits", size(report["label_bytes_logits"])),
        ("Label bytes: class indices (top-k)", size(report.get("label_bytes_index", 0))),
        ("Label bytes: augmentation params", size(report["label_bytes_aug"])),
        ("Label pool against the full 1x pool", ratio(report.get("label_ratio_to_full_pool"))),
        ("Label records", f"{report['label_records']:,}"),
        ("Label files (`labels/`)", size(report["label_file_bytes"])),
        ("Image files (`images/`)", size(report["image_bytes"])),
        ("Seed", str(report["seed"])),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def wall_table(wall_seconds: dict[str, float]) -> list[str]:
    """Wall time per stage run in this invocation, and their sum."""
    if not wall_seconds:
        return ["No stage before the report ran in this invocation."]
    lines = ["| Stage | Wall time |", "|---|---|"]
    lines += [f"| {stage} | {duration(s)} |" for stage, s in wall_seconds.items()]
    return [*lines, f"| **total** | **{duration(sum(wall_seconds.values()))}** |"]


def sheet_section(sheet: bool, class_names: list[str] | None) -> list[str]:
    """The contact sheet's link and its legend: the class of each row, top to bottom."""
    if not sheet:
        return ["No contact sheet: the recover stage has not run."]
    lines = [f"![contact sheet: the first images of each class]({SHEET_OBJECT.rsplit('/', 1)[1]})", ""]
    if class_names:
        shown = class_names[:SHEET_CLASSES]
        lines.append("Rows, top to bottom: " + ", ".join(f"{i} {name}" for i, name in enumerate(shown)) + ".")
    return lines


def curve_section(histories: dict[str, list[dict]], curve: bool) -> list[str]:
    """The training curve's link and the last epoch of each model."""
    if not curve:
        return ["No training history recorded (the models were trained before histories were kept, or not yet)."]
    lines = [f"![training loss and test top-1 against epoch]({CURVE_OBJECT.rsplit('/', 1)[1]})", ""]
    for label, history in histories.items():
        last = history[-1]
        evaluated = [r for r in history if r.get("test_top1") is not None]
        top1 = f", test top-1 {percent(evaluated[-1]['test_top1'])}" if evaluated else ""
        lines.append(f"- {label}: {len(history)} epochs recorded, last loss {last['loss']:.4f}{top1}, "
                     f"{duration(sum(r.get('seconds', 0.0) for r in history))} of training")
    return lines


def report_markdown(report: dict, class_names: list[str] | None, sheet: bool,
                    histories: dict[str, list[dict]], curve: bool) -> str:
    """The whole of report.md; the PNGs are linked relative to it (they lie beside it)."""
    lines = ["# LPLD run report", "", *summary_table(report), "",
             "## Wall time per stage (of the stages run in this invocation)", "", *wall_table(report["wall_seconds"]), "",
             "## Distilled images", "", *sheet_section(sheet, class_names), "",
             "## Training", "", *curve_section(histories, curve), ""]
    return "\n".join(lines)


def write_report_md(store: Store, report: dict, class_names: list[str] | None,
                    histories: dict[str, list[dict]]) -> str:
    """Write the training curve (when there is a history) and ``report/report.md``; returns the latter's URI."""
    curve = write_training_curve(store, histories) is not None
    text = report_markdown(report, class_names, store.exists(SHEET_OBJECT), histories, curve)
    store.write_text(REPORT_MD_OBJECT, text)
    return store.uri(REPORT_MD_OBJECT)
