"""Build hook: compile the optional C decoder (`cdc_sync/protocol/_speedups.c`) into the wheel.

Contract: with a working C compiler, a wheel (and an editable install: the module is then built
next to its source) gets `cdc_sync.protocol._speedups`, and the wheel is tagged for this Python
and platform. Without one, or with `CDC_SYNC_NO_EXTENSIONS=1`, the build still succeeds, prints
a warning and the wheel is pure Python: cdc-sync then decodes in Python (about 8x slower per row,
same results). setuptools is used only as a portable driver for the platform's compiler.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "cdc_sync.protocol._speedups"
SOURCE = "cdc_sync/protocol/_speedups.c"


def compile_speedups(root: Path, build_dir: Path, *, inplace: bool) -> Path:
    """Compile the extension; its path (next to the source when `inplace`)."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    ext = Extension(MODULE, [SOURCE], extra_compile_args=["-O2"] if os.name != "nt" else [])
    dist = Distribution({"name": "cdc-sync-speedups", "ext_modules": [ext]})
    cmd = build_ext(dist)
    cmd.inplace = inplace
    cmd.build_lib = str(build_dir / "lib")
    cmd.build_temp = str(build_dir / "temp")
    cwd = os.getcwd()
    os.chdir(root)  # setuptools resolves the source and the in-place target from here
    try:
        cmd.ensure_finalized()
        cmd.run()
        built = Path(cmd.get_ext_fullpath(MODULE))
    finally:
        os.chdir(cwd)
    return built if built.is_absolute() else root / built


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"
    _build_dir: Path | None = None

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        editable = version == "editable"
        if editable:  # an earlier in-place build must not outlive this install
            for old in (root / SOURCE).parent.glob("_speedups.*"):
                if old.suffix in (".so", ".pyd"):
                    old.unlink()
        if os.environ.get("CDC_SYNC_NO_EXTENSIONS", "") not in ("", "0"):
            return
        build_dir = self._build_dir = Path(tempfile.mkdtemp(prefix="cdc_sync-ext-"))
        try:
            built = compile_speedups(root, build_dir, inplace=editable)
        except Exception as exc:  # no compiler, no headers: the pure-Python decoder is used
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            self.app.display_warning(
                f"cdc-sync: the C decoder was not built ({reason}); "
                "cdc-sync will decode in pure Python (same results, slower)")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if not editable:
            build_data["force_include"][str(built)] = f"cdc_sync/protocol/{built.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._build_dir is not None:
            shutil.rmtree(self._build_dir, ignore_errors=True)
