"""The layers of ARCHITECTURE.md ("Layers and where they live"): what each package may import
from cdc_sync. Besides the table, every layer but `protocol` may use the shared base modules
(errors, settings, session settings, backoff, logging); the wiring (`pipeline`, `commands`,
`cli`, `api`, …) may import anything. Checked on the source, statically."""

from __future__ import annotations

import ast
from pathlib import Path

import cdc_sync

ROOT = Path(cdc_sync.__file__).parent
BASE = {"errors", "config", "sessions", "backoff", "logs"}
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),  # standard library only (tests/protocol/test_stdlib_only.py)
    "source": {"protocol"} | BASE,
    "changes": {"protocol"} | BASE,
    "resolve": {"changes"} | BASE,
    # sinks also read protocol's constants and Lsn (what changes carries)
    "sinks": {"changes", "resolve", "protocol"} | BASE,
    "connectors": {"changes"} | BASE,
    "embedded": BASE,
}


def _part(dotted: str) -> str:
    """The layer a `cdc_sync.x.y` module belongs to (`x`)."""
    return dotted.split(".")[1] if "." in dotted else ""


def _imports(path: Path) -> set[str]:
    """The cdc_sync modules `path` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cdc_sync."):
                found.add(target)
            elif target == "cdc_sync":  # from cdc_sync import x
                found.update(f"cdc_sync.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cdc_sync."))
    return found


def test_every_layer_imports_only_what_the_architecture_allows() -> None:
    bad = []
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        layer = _part(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
        if layer not in ALLOWED:
            continue
        checked += 1
        for target in sorted(_imports(path)):
            other = _part(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {target}")
    assert checked > 20
    assert bad == []


def test_the_check_sees_relative_imports() -> None:
    stream = ROOT / "source" / "stream.py"
    assert "cdc_sync.protocol" in _imports(stream)
    assert "cdc_sync.sessions" in _imports(stream)
