"""Ray's own lines kept out of a normal run's log, so that what the job says is what a person reads.

Where Ray has a switch, the cause is switched off: Ray Train's controller and worker-group lines ("Requesting
resources", "Started training worker group", ...) by ``RunConfig(logging_config=LoggingConfig("WARNING"))``
(:data:`TRAIN_LOG_LEVEL`), and the worker's per-report "Reporting training result" line, whose logger is named after
its source file, by that logger's level (:func:`quiet_train_worker`). What Ray offers no switch for is filtered out of
the worker output Ray forwards to the driver (:func:`filter_forwarded_logs`): the output of Ray Train's detached
PlacementGroupCleaner actor (its monitor thread's traceback when it loses the race with the controller's shutdown) and
the C++ "constructor arguments in the object store and max_restarts > 0" error line of Ray Train's own actors, and
the warnings Ray itself calls "safe to ignore" (with their tracebacks: Ray Train's resource request timing out on a
busy machine). Every dropped line is still logged at DEBUG (``--log-level DEBUG``)."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

log = logging.getLogger(__name__)

TRAIN_LOG_LEVEL = "WARNING"
# Ray-internal actors whose every forwarded line is dropped.
INTERNAL_ACTORS = ("PlacementGroupCleaner",)
# Ray-internal lines dropped whichever process forwards them.
INTERNAL_LINES = (
    re.compile(r"core_worker\.cc:\d+: Actor with class name: '\w+' .*constructor arguments in the object store "
               r"and max_restarts > 0"),
    re.compile(r"PlacementGroupCleaner"),
    re.compile(r"it's safe to ignore this error"),  # e.g. Ray Train's resource request timing out on a busy machine
)
_PRINTER = "ray_print_logs"  # the name Ray's driver gives its printer of forwarded worker output


def internal(batch: dict[str, Any], line: str) -> bool:
    """Whether ``line`` of a forwarded ``batch`` (Ray's dict: pid, actor_name, task_name, lines, ...) is Ray's own."""
    name = batch.get("actor_name") or batch.get("task_name") or ""
    return name.startswith(INTERNAL_ACTORS) or any(p.search(line) for p in INTERNAL_LINES)


def _continues_traceback(line: str) -> bool:
    """A line after the one that named Ray's internals that belongs to the same traceback."""
    return not line.strip() or line[:1].isspace() or line.startswith("Traceback") or bool(_EXCEPTION.match(line))


_EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b")


def kept(batch: dict[str, Any]) -> dict[str, Any] | None:
    """``batch`` without Ray's own lines, and the traceback lines that follow one (logged at DEBUG instead); None
    when nothing is left."""
    rest, dropped, skipping = [], [], False
    for line in batch.get("lines") or []:
        skipping = internal(batch, line) or (skipping and _continues_traceback(line))
        (dropped if skipping else rest).append(line)
    if not dropped:
        return batch
    who = batch.get("actor_name") or batch.get("task_name") or "worker"
    for line in dropped:
        log.debug("ray-internal (%s pid=%s): %s", who, batch.get("pid"), line)
    return {**batch, "lines": rest} if rest else None


def filtered(printer: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def print_kept(batch: dict[str, Any]) -> None:
        left = kept(batch)
        if left is not None:
            printer(left)

    print_kept.lpld_filtered = True  # type: ignore[attr-defined]
    return print_kept


def filter_forwarded_logs() -> None:
    """In the driver, after ray.init: wrap Ray's printer of forwarded worker output with :func:`kept`. Ray keeps it in
    a private dispatcher; should that change, nothing is filtered and nothing breaks."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        dispatcher.handlers = [(name, handler if name != _PRINTER or getattr(handler, "lpld_filtered", False)
                                else filtered(handler)) for name, handler in dispatcher.handlers]


def quiet_train_worker() -> None:
    """In a Ray Train worker: its per-report INFO line ("Reporting training result ...") off; ours say each epoch."""
    logging.getLogger("ray.train").setLevel(TRAIN_LOG_LEVEL)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(TRAIN_LOG_LEVEL)
