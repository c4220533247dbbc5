"""The package's layers (DESIGN section 6): who may import whom, checked over every import of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lpld_ray"
INNER = ("lpld_ray.store", "lpld_ray.data", "lpld_ray.pipeline", "lpld_ray.distributed", "lpld_ray.cli")
OBJECT_STORES = ("fsspec", "s3fs", "gcsfs")

# layer -> imports it must not make (a module counts when the import names it or a submodule of it)
FORBIDDEN = {
    "method": (*INNER, "ray", *OBJECT_STORES),
    "store": ("lpld_ray.method", "lpld_ray.data", "lpld_ray.pipeline", "lpld_ray.distributed", "lpld_ray.cli", "ray"),
    "data": ("lpld_ray.pipeline", "lpld_ray.distributed", "lpld_ray.cli", "ray"),
    "pipeline": ("lpld_ray.distributed", "lpld_ray.cli", "ray"),
    "config.py": ("lpld_ray.method", *INNER, "ray", *OBJECT_STORES),
    "config_errors.py": ("lpld_ray.method", *INNER, "ray", *OBJECT_STORES),
    "config_io.py": ("lpld_ray.method", *INNER, "ray", *OBJECT_STORES),
}


def imports_of(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any depth (function-level imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def names_any(imported: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported if any(n == p or n.startswith(p + ".") for p in prefixes))


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    paths = [p for p in modules() if p.relative_to(PACKAGE).parts[0] == layer]
    assert paths, f"no modules in layer {layer}"
    bad = {str(p.relative_to(PACKAGE)): names_any(imports_of(p), FORBIDDEN[layer]) for p in paths}
    assert not {k: v for k, v in bad.items() if v}


def test_only_distributed_imports_ray():
    users = {str(p.relative_to(PACKAGE)) for p in modules() if names_any(imports_of(p), ("ray",))}
    assert users and all(u.startswith("distributed/") for u in users), users


def test_only_the_store_module_imports_fsspec():
    users = {str(p.relative_to(PACKAGE)) for p in modules() if names_any(imports_of(p), OBJECT_STORES)}
    assert users == {"store/storage.py"}


def test_nothing_in_the_package_imports_the_testing_support():
    """lpld_ray/testing/ (counting S3, local multi-node Ray, tiny trees) serves tests and benchmarks only."""
    users = {str(p.relative_to(PACKAGE)) for p in modules()
             if p.relative_to(PACKAGE).parts[0] != "testing" and names_any(imports_of(p), ("lpld_ray.testing",))}
    assert not users, users


def test_the_testing_support_imports_neither_ray_nor_fsspec():
    """It drives Ray through its command line (as a user does) and storage through the Store."""
    paths = [p for p in modules() if p.relative_to(PACKAGE).parts[0] == "testing"]
    assert paths
    bad = {str(p.relative_to(PACKAGE)): names_any(imports_of(p), ("ray", *OBJECT_STORES)) for p in paths}
    assert not {k: v for k, v in bad.items() if v}


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.train\n    from lpld_ray.store.storage import Store\n")
    assert names_any(imports_of(module), ("ray", "lpld_ray.store")) == ["lpld_ray.store.storage",
                                                                       "lpld_ray.store.storage.Store", "ray.train"]
