"""What a person reads during and after a run: a live bar on a terminal and plain lines elsewhere, no Ray-internal
lines or tracebacks among the job's own, and a last line naming the report."""

from __future__ import annotations

import io
import logging

from conftest import REPO

from lpld_ray.distributed import ray_logs
from lpld_ray.pipeline.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(caplog):
    terminal, piped = Terminal(), io.StringIO()
    with caplog.at_level(logging.INFO, logger="lpld_ray.pipeline.progress"):
        bar = Progress("recover", 3, every_s=0.0, stream=terminal)
        for _ in range(3):
            bar.advance()
        bar_lines = [r.getMessage() for r in caplog.records]
        caplog.clear()
        plain = Progress("relabel", 3, every_s=0.0, stream=piped)
        for _ in range(3):
            plain.advance()
        plain_lines = [r.getMessage() for r in caplog.records]
    assert "3/3" in terminal.getvalue() and "recover" in terminal.getvalue()  # tqdm's bar
    assert len(bar_lines) == 1 and bar_lines[0].startswith("recover: 3/3 shards")  # and the total, once
    assert piped.getvalue() == ""
    assert [line.split(",")[0] for line in plain_lines] == [f"relabel: {i}/3 shards" for i in (1, 2, 3)]
    assert "ETA" in plain_lines[0]


def batch(lines: list[str], actor: str = "TrainController") -> dict:
    return {"pid": 42, "actor_name": actor, "lines": lines, "is_err": True}


def test_ray_internal_lines_and_their_tracebacks_are_dropped(caplog):
    ours = "teacher epoch 1/4 loss 0.61 | 40.2 s/epoch, ETA 120 s"
    internal = batch([
        "[2026-12-02 12:28:25,219 E 5020 5075] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
        "'7b7b' has constructor arguments in the object store and max_restarts > 0. If the arguments ...",
        "Failed to stop PlacementGroupCleaner gracefully.",
        "Traceback (most recent call last):",
        '  File "placement_group_callback.py", line 121, in _stop_cleaner',
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        ours,
    ])
    with caplog.at_level(logging.DEBUG, logger="lpld_ray.distributed.ray_logs"):
        assert ray_logs.kept(internal)["lines"] == [ours]
    assert len(caplog.records) == 5  # each dropped line is still there at DEBUG
    assert ray_logs.kept(batch(["Exception in thread PlacementGroupCleanerMonitor:", "Traceback ..."],
                               actor="PlacementGroupCleaner")) is None
    busy = batch([  # as a 2-core machine under load printed it, between the job's own lines
        "Failed to send resource request for train-e75a. If this only happens transiently during network partition or "
        "CPU being overloaded, it's safe to ignore this error. If this error persists, file a GitHub issue.",
        "Traceback (most recent call last):",
        '  File ".../autoscaling_coordinator_client.py", line 58, in send_resource_request',
        "    ray.get(",
        "           ^^^^^^^^^^^^^^^^^^^",
        '  File "python/ray/_raylet.pyx", line 3471, in ray._raylet.CoreWorker.get_objects',
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        "loaded fashion_mnist train: 1000 images, 10 classes",
    ])
    assert ray_logs.kept(busy)["lines"] == ["loaded fashion_mnist train: 1000 images, 10 classes"]
    plain = batch([ours], actor="RayTrainWorker")
    assert ray_logs.kept(plain) is plain


def test_the_driver_prints_forwarded_output_without_ray_internals(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[dict] = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", printed.append), ("other", lambda b: None)])
    ray_logs.filter_forwarded_logs()
    ray_logs.filter_forwarded_logs()  # once is enough: not wrapped twice
    dispatcher.emit(batch(["loaded fashion_mnist train: 1000 images", "Failed to stop PlacementGroupCleaner."]))
    dispatcher.emit(batch(["anything"], actor="PlacementGroupCleaner"))
    assert [b["lines"] for b in printed] == [["loaded fashion_mnist train: 1000 images"]]


def test_a_train_worker_drops_ray_trains_per_report_line():
    from ray.train.v2._internal.execution import context

    ray_logs.quiet_train_worker()
    assert not logging.getLogger(context.__file__).isEnabledFor(logging.INFO)
    assert not logging.getLogger("ray.train").isEnabledFor(logging.INFO)


def test_the_job_ends_by_naming_its_report(cli, monkeypatch, tmp_path, caplog):
    import lpld_ray.cli as cli_module

    summary = {"report": {"report": "R/report/report.json", "report_md": "R/report/report.md", "wall_seconds": 1.0}}
    monkeypatch.setattr(cli_module, "run_pipeline", lambda *_a, **_k: summary)
    preset = str(REPO / "jobs" / "configs" / "fashion_mnist.yaml")
    code, errors, _ = cli(["--config", preset, "--run-dir", str(tmp_path / "run"), "--set", "data.train_per_class=20"])
    assert code == 0 and not errors
    assert caplog.records[-1].getMessage() == "done: the report to read is R/report/report.md"
