"""`cdc-sync demo`: three offices in multi-directional sync on a PostgreSQL of their own.

The slow test runs the real command as a user would (`python -m cdc_sync demo --seconds 8`,
output not a terminal, so plain progress lines) and checks it converged; the others check the
configuration the demo gives each office and its summary on a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from integration.helpers import REPO_ROOT

from cdc_sync.demo import OFFICES, DemoResult, office_settings

SUMMARY = re.compile(
    r"^demo: 3 offices converged: (?P<changes>\d+) changes, (?P<conflicts>\d+) conflicts? "
    r"resolved, (?P<dead>\d+) dead letters?, identical rows \((?P<grants>\d+) grants, "
    r"(?P<lines>\d+) budget lines\)$", re.M)


def test_office_settings_make_each_office_a_source() -> None:
    dsns = {o: f"postgresql://postgres@127.0.0.1:5999/{o}" for o in OFFICES}
    for office in OFFICES:
        s = office_settings(office, dsns)
        assert s.source.name == office and s.source.dsn == dsns[office]
        assert s.source.slot == s.source.publication == f"cdc_sync_{office}"
        assert [site.name for site in s.sites] == [o for o in OFFICES if o != office]
        assert [site.dsn for site in s.sites] == [dsns[o] for o in OFFICES if o != office]
        assert s.conflicts.strategy == "lww"
        assert s.conflicts.version_column is None  # commit timestamps decide
        assert not s.source.forward_origins  # applied writes are not sent on again


def test_result_is_ok_only_when_converged_identical_and_writers_healthy() -> None:
    good = DemoResult(converged=True, identical=True, writes=10, applied=20, conflicts=1,
                      dead_letters=0)
    assert good.ok
    assert not DemoResult(converged=False, identical=True, writes=1, applied=1, conflicts=0,
                          dead_letters=0).ok
    assert not DemoResult(converged=True, identical=False, writes=1, applied=1, conflicts=0,
                          dead_letters=0).ok
    assert not DemoResult(converged=True, identical=True, writes=1, applied=1, conflicts=0,
                          dead_letters=0, writer_errors=["writer tokyo: boom"]).ok


@pytest.mark.slow
def test_demo_command_converges() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "cdc_sync", "demo", "--seconds", "8"],
                          capture_output=True, text=True, timeout=240, env=env,
                          cwd=str(REPO_ROOT), check=False)
    detail = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    match = SUMMARY.search(proc.stdout)
    assert match, detail
    # Three writers for 8 s at about 1,500 rows/s each (set-based transactions): thousands of
    # changes a second in all, not the 55 of one-row transactions; at least 8,000 even when
    # the machine is busy.
    assert int(match["changes"]) >= 8000, detail
    assert int(match["conflicts"]) > 0, detail
    assert int(match["grants"]) > 0, detail
    assert int(match["dead"]) == 0, detail
    # Not a terminal: periodic plain lines, one segment per office, no escape sequences.
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) >= 3, detail
    assert all(f"{office}: " in line for line in progress for office in OFFICES), detail
    assert "\x1b[" not in proc.stdout
    assert "Traceback" not in proc.stderr, detail
