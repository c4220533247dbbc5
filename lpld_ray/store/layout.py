"""The run directory's layout (DESIGN section 4): the folder each stage writes, and the run-level objects."""

from __future__ import annotations

TEACHER_STAGE = "teacher"
STATS_STAGE = "stats"
IMAGES_STAGE = "images"
LABELS_STAGE = "labels"
STUDENT_STAGE = "train"
REPORT_STAGE = "report"

# stage name -> the folder under the run root it writes (the stage table in lpld_ray.pipeline.stages reads this)
FOLDERS = {
    "teacher": TEACHER_STAGE,
    "squeeze": STATS_STAGE,
    "recover": IMAGES_STAGE,
    "relabel": LABELS_STAGE,
    "train": STUDENT_STAGE,
    "report": REPORT_STAGE,
}
PRODUCERS = {folder: stage for stage, folder in FOLDERS.items()}  # folder -> the stage that writes it
RUN_RECORD = "run.yaml"
TRAIN_RUN_PREFIX = "ray_train"  # <teacher|train>/ray_train-<key>/: a Ray Train run's checkpoints
LABELS_OBJECT = "labels.parquet"  # the one object of a labels shard


def image_object_name(class_id: int, index: int, ext: str = "png") -> str:
    """The object name of image ``index`` of class ``class_id`` in its images shard (``ext``: png or jpg)."""
    return f"{class_id:05d}_{index:04d}.{ext}"


def image_id_from_name(name: str, ipc: int) -> int:
    """Run-wide image id (``class_id * ipc + index``) of an image object ``CCCCC_IIII.png`` (or ``.jpg``)."""
    class_id, index = name.split(".")[0].split("_")
    return int(class_id) * int(ipc) + int(index)
