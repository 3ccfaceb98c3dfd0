"""The layering of docs/architecture.md holds: nothing imports upward, and the CLI reaches the
daemon only through the client.

The rule is read from the table in the document itself, so the document and the code cannot
drift apart: a new import across layers fails here until the document says why it is allowed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "agentd"
DOC = REPO / "docs" / "architecture.md"
SHARED = {"api.gen", "api.limits"}  # units finer than a package, named in the table


def allowed() -> dict[str, set[str]]:
    text = DOC.read_text()
    block = text[text.index("<!-- layering:begin -->"):text.index("<!-- layering:end -->")]
    rules: dict[str, set[str]] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("unit", "---") or not line.startswith("|"):
            continue
        rules[cells[0]] = {u.strip() for u in cells[1].split(",") if u.strip()}
    return rules


def unit_of(module: str) -> str:
    """agentd.api.gen.v1.x -> api.gen; agentd.scheduler.steps -> scheduler; agentd.logs -> logs;
    agentd_client.x -> agentd_client (the light client, a package of its own)."""
    if module.split(".", maxsplit=1)[0] == "agentd_client":
        return "agentd_client"
    parts = [p for p in module.split(".")[1:] if p != "__init__"]
    if not parts:
        return "agentd"
    if ".".join(parts[:2]) in SHARED:
        return ".".join(parts[:2])
    return parts[0]


def imports_of(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[:-node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("agentd")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("agentd")]
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "gen" not in p.relative_to(PACKAGE).parts)


def test_the_table_names_every_unit() -> None:
    """Every package and top-level module has a row: a new one must take its place."""
    rules = allowed()
    units = {unit_of(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in sources()}
    units.discard("agentd")  # agentd/__init__.py
    assert units - set(rules) == set(), "add these to the layering table in docs/architecture.md"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_import_goes_upward(path: Path) -> None:
    rules = allowed()
    source = unit_of(".".join(path.relative_to(REPO).with_suffix("").parts))
    if source == "agentd":
        return
    bad = []
    for line, target in imports_of(path):
        unit = unit_of(target)
        if unit in (source, "agentd") or (source == "api" and unit in SHARED):
            continue
        if unit not in rules.get(source, set()):
            bad.append(f"{path.relative_to(REPO)}:{line} imports {target} ({source} -> {unit})")
    assert bad == [], "imports against docs/architecture.md's layering:\n" + "\n".join(bad)


def test_the_light_client_imports_nothing_of_the_daemon() -> None:
    """agentd_client is installed without agentd (clients/python): it may not import it."""
    bad = []
    for path in sorted((REPO / "agentd_client").rglob("*.py")):
        bad += [f"{path.relative_to(REPO)}:{line} imports {target}"
                for line, target in imports_of(path)
                if target == "agentd" or target.startswith("agentd.")]
    assert bad == []


def test_the_cli_reaches_the_daemon_only_through_the_client() -> None:
    """No generated stub and no daemon-side unit in agentctl (the table says so; this names it)."""
    cli = allowed()["cli"]
    assert not cli & {"api", "api.gen", "scheduler", "sandbox", "store", "daemon"}
    for path in (PACKAGE / "cli").rglob("*.py"):
        assert not [t for _, t in imports_of(path) if re.match(r"agentd\.api\b", t)], path
