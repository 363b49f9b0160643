"""The scripts in benchmarks/ use probe's public API only (issue 42): `import probe`, `from probe import ...`,
`probe.api`; those that time probe's internal pieces live in benchmarks/internal/, which says so in its README."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import probe

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
PUBLIC = {*probe.__all__, "api"}


def internal_uses(path: Path) -> list[str]:
    """What a script reaches of probe other than its public API: `line: import` or `line: probe.name`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("probe."):
            if node.module != "probe.api":
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "probe":
            found += [f"{node.lineno}: from probe import {a.name}" for a in node.names if a.name not in PUBLIC]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("probe.") and a.name != "probe.api"]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "probe":
            if node.attr not in PUBLIC:
                found.append(f"{node.lineno}: probe.{node.attr}")
    return sorted(found, key=lambda line: int(line.split(":")[0]))


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_scripts_use_the_public_api_only(script):
    assert internal_uses(BENCHMARKS / script) == []


def test_the_rule_finds_internal_imports(tmp_path):
    script = tmp_path / "x.py"
    script.write_text("import probe\nimport probe.backends\nfrom probe.data import open_data\nfrom probe import api, Model"
                      ", evaluate, cells\nfrom probe.api import train_command\nprobe.load_model\nprobe.cells\n", encoding="utf-8")
    assert internal_uses(script) == ["2: import probe.backends", "3: from probe.data import ...", "4: from probe import cells",
                                     "7: probe.cells"]


def test_internal_benchmarks_say_what_they_are():
    """Scripts that time internal pieces are kept apart, with a README saying they are outside the API's promise."""
    internal = BENCHMARKS / "internal"
    if internal.is_dir():
        assert "not part of" in (internal / "README.md").read_text(encoding="utf-8")
