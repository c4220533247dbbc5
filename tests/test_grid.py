"""jobs/grid.py's tables and its accuracy-against-storage plot, from finished cells' report.json files."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

from PIL import Image

from lpld_ray.pipeline.plots import frontier


def load_grid():
    spec = importlib.util.spec_from_file_location("grid", Path(__file__).parents[1] / "jobs" / "grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cell(out: Path, name: str, seed: int, top1: float | None, labels: int, images: int, k: float) -> None:
    folder = out / f"{name}_ipc10_k{k:g}_s{seed}" / "report"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"student_top1": top1, "ipc": 10, "compression": k, "seed": seed,
                                                    "label_bytes": labels, "image_bytes": images}))


def test_by_seeds_and_the_storage_plot(tmp_path):
    grid = load_grid()
    for seed, top1, images in ((0, 0.80, 1000), (1, 0.83, 1200)):
        write_cell(tmp_path, "lpld", seed, top1, 4000, images, 40)
    write_cell(tmp_path, "lpld", 0, 0.85, 160_000, 1000, 1)
    write_cell(tmp_path, "lpld-top2", 0, 0.79, 3000, 1000, 40)
    write_cell(tmp_path, "sre2l", 0, None, 4000, 1000, 40)  # not finished: left out
    cells = grid.finished_cells(str(tmp_path))
    assert set(cells) == {("lpld", 10, 40), ("lpld", 10, 1), ("lpld-top2", 10, 40)}
    table = grid.by_seeds(cells)
    assert "| lpld | 10 | 40 | 0: 80.00%, 1: 83.00% | 81.50% | 3.00 | 5,100 |" in table
    lines = grid.plot_lines(cells)
    assert sorted(lines["lpld IPC 10"]) == [(4000.0, 79.0, "k 40 top2"), (5100.0, 81.5, "k 40"),
                                            (161_000.0, 85.0, "k 1")]
    assert frontier(lines["lpld IPC 10"]) == [(4000.0, 79.0, "k 40 top2"), (5100.0, 81.5, "k 40"),
                                              (161_000.0, 85.0, "k 1")]
    assert frontier([(1.0, 80.0, "a"), (1.0, 82.0, "b"), (2.0, 81.0, "c"), (3.0, 83.0, "d")]) == [
        (1.0, 82.0, "b"), (3.0, 83.0, "d")]
    png = Image.open(io.BytesIO(grid.accuracy_storage_png(lines)))
    assert png.format == "PNG" and png.size[0] > 300


def test_images_from_finds_the_cell_with_images_of_the_same_method_ipc_and_seed(tmp_path):
    import pytest

    grid = load_grid()
    for cell in ("lpld_ipc10_k1_s0", "lpld_ipc10_k40_s1", "sre2l_ipc10_k1_s0"):
        (tmp_path / cell / "images" / "shard-00000").mkdir(parents=True)
        (tmp_path / cell / "images" / "shard-00000" / "_MANIFEST.json").write_text("{}")
    (tmp_path / "lpld_ipc10_k1_s2" / "report").mkdir(parents=True)  # a cell without images
    assert grid.earlier_images(str(tmp_path), "lpld", 10, 0) == str(tmp_path / "lpld_ipc10_k1_s0")
    assert grid.earlier_images(str(tmp_path), "lpld", 10, 1) == str(tmp_path / "lpld_ipc10_k40_s1")
    with pytest.raises(SystemExit, match="no finished lpld_ipc10_k\\*_s2 cell with images"):
        grid.earlier_images(str(tmp_path), "lpld", 10, 2)


def test_include_merges_the_seeds_of_cells_of_the_same_name_from_other_grids(tmp_path):
    grid = load_grid()
    write_cell(tmp_path / "a", "real-top1c", 0, 0.88, 25_000, 250_000, 6)
    write_cell(tmp_path / "b", "real-top1c", 1, 0.87, 25_000, 260_000, 6)
    write_cell(tmp_path / "b", "real", 1, 0.90, 11_100_000, 260_000, 1)
    cells = grid.finished_cells(str(tmp_path / "a"), str(tmp_path / "b"))
    assert sorted(cells[("real-top1c", 10, 6)]) == [0, 1]
    assert "| real-top1c | 10 | 6 | 0: 88.00%, 1: 87.00% | 87.50% | 1.00 | 280,000 |" in grid.by_seeds(cells)
    assert sorted(cells) == [("real", 10, 1), ("real-top1c", 10, 6)]
