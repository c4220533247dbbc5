"""docs/RECIPES.md and the presets cannot drift: every table row's "ours" value is the preset's value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lpld_ray.config_io import config_to_dict, flatten, load_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "RECIPES.md"
PRESETS = ("imagenet1k_rn18", "tiny_imagenet_rn18", "imagenet21kp_rn18")


def recipe_tables(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Per '## <preset>' section, its table rows (setting, ours, official, official file)."""
    tables: dict[str, list[tuple[str, str, str, str]]] = {}
    section = None
    for line in text.splitlines():
        heading = re.match(r"^## (\S+)\s*$", line)
        if heading:
            section = heading.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if section in PRESETS and len(cells) == 4 and cells[0] not in ("setting", "---"):
            tables.setdefault(section, []).append(tuple(cells))
    return tables


TABLES = recipe_tables(DOC.read_text(encoding="utf-8"))


def test_every_preset_has_a_table():
    assert set(TABLES) == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_table_matches_the_preset(preset):
    values = flatten(config_to_dict(load_config(f"jobs/configs/{preset}.yaml")))
    seen = set()
    for setting, ours, official, source in TABLES[preset]:
        assert setting in values, f"{preset}: '{setting}' is not a config key"
        assert setting not in seen, f"{preset}: '{setting}' twice"
        seen.add(setting)
        assert values[setting] == yaml.safe_load(ours), f"{preset}: {setting} is {values[setting]!r}, the doc says {ours}"
        assert official and source, f"{preset}: {setting} has no official value or file"
    for key in ("recover.lr", "recover.r_bn", "recover.iterations", "train.batch_size", "data.normalization"):
        assert key in seen, f"{preset}: the table lacks {key}"
