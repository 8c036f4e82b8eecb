"""`cdc_sync/protocol` imports only the standard library (relative imports within it are fine),
and none of its I/O, clock or logging modules: the codecs are pure functions of their bytes."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import cdc_sync.protocol

PROTOCOL_DIR = Path(cdc_sync.protocol.__file__).parent
IO_MODULES = {"socket", "select", "selectors", "asyncio", "ssl", "io", "os", "subprocess",
              "threading", "logging", "time"}


def _imports(path: Path) -> list[tuple[int, str | None, int]]:
    """(level, module, line) of every import in a module; level > 0 is relative."""
    found: list[tuple[int, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((0, alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.append((0, "__import__()", node.lineno))
    return found


def test_protocol_modules_import_only_the_standard_library() -> None:
    modules = sorted(PROTOCOL_DIR.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "_decode.py", "_frames.py", "_lsn.py"}
    bad = []
    for path in modules:
        for level, module, line in _imports(path):
            if level > 0:
                continue
            top = (module or "").split(".")[0]
            if top not in sys.stdlib_module_names or top in IO_MODULES:
                bad.append(f"{path.name}:{line}: import {module}")
    assert not bad, "cdc_sync/protocol must import only non-I/O standard library: " + str(bad)


def test_the_check_catches_third_party_and_io(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import psycopg\nfrom socket import socket\nfrom . import x\nimport struct\n")
    imports = _imports(sample)
    assert [(lvl, mod) for lvl, mod, _ in imports] == [
        (0, "psycopg"), (0, "socket"), (1, None), (0, "struct"),
    ]
    assert "psycopg" not in sys.stdlib_module_names
    assert "socket" in IO_MODULES and "struct" in sys.stdlib_module_names


# The optional C decoder (`_speedups.c`) keeps the same rule: the CPython API and the C standard
# library's pure headers, no I/O.
C_HEADERS = {"Python.h", "stdint.h", "string.h", "stddef.h", "limits.h"}


def test_c_sources_include_only_python_and_pure_c_headers() -> None:
    sources = sorted(PROTOCOL_DIR.glob("*.c"))
    assert [p.name for p in sources] == ["_speedups.c"]
    for path in sources:
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.MULTILINE)
        assert includes and set(includes) <= C_HEADERS, (path.name, includes)
