"""The result model of a benchmark run and its three forms: a text table, JSON and markdown.

A scenario measures one figure (seconds, milliseconds, megabytes) for cdc-sync and, where
PostgreSQL has a comparable one, for native logical replication, once per repetition. The
reported value is the median of the repetitions; the ratio is cdc-sync / native of those
medians. A scenario's target bounds either the ratio or cdc-sync's own value.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from benchmarks.harness import Harness

__all__ = [
    "Measurement",
    "Scenario",
    "ScenarioResult",
    "Target",
    "markdown_table",
    "text_table",
    "write_results",
]


@dataclass(frozen=True)
class Target:
    """What a scenario must reach: ``subject`` (the ratio, or cdc-sync's value) ≤ ``limit``."""

    subject: Literal["ratio", "cdc_sync"]
    limit: float

    def describe(self, unit: str) -> str:
        if self.subject == "ratio":
            return f"ratio ≤ {self.limit:g}"
        return f"cdc-sync ≤ {self.limit:g} {unit}"


@dataclass
class Measurement:
    """What a scenario's ``run`` returns: one sample per repetition, plus free-form details."""

    cdc_sync: list[float]
    native: list[float] | None  # None: PostgreSQL has no comparable figure
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One benchmark: ``run(harness, repetitions)`` measures it on the shared clusters."""

    key: str
    title: str
    metric: str
    unit: str
    target: Target
    run: Callable[[Harness, int], Measurement]
    sites: int = 1  # site databases, each on its own subscriber cluster


def _median(samples: Sequence[float] | None) -> float | None:
    return statistics.median(samples) if samples else None


@dataclass
class ScenarioResult:
    """A scenario's outcome: its samples, or the one-line error that stopped it."""

    scenario: Scenario
    cdc_sync_samples: list[float] = field(default_factory=list)
    native_samples: list[float] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def cdc_sync(self) -> float | None:
        return _median(self.cdc_sync_samples)

    @property
    def native(self) -> float | None:
        return _median(self.native_samples)

    @property
    def ratio(self) -> float | None:
        cdc, native = self.cdc_sync, self.native
        if cdc is None or native is None or native <= 0:
            return None
        return cdc / native

    @property
    def passed(self) -> bool | None:
        target = self.scenario.target
        value = self.ratio if target.subject == "ratio" else self.cdc_sync
        return None if value is None else value <= target.limit

    def to_json(self) -> dict[str, Any]:
        sc = self.scenario
        return {
            "key": sc.key,
            "title": sc.title,
            "metric": sc.metric,
            "unit": sc.unit,
            "cdc_sync": self.cdc_sync,
            "native": self.native,
            "ratio": self.ratio,
            "target": {"subject": sc.target.subject, "limit": sc.target.limit,
                       "text": sc.target.describe(sc.unit)},
            "passed": self.passed,
            "samples": {"cdc_sync": self.cdc_sync_samples, "native": self.native_samples},
            "details": self.details,
            "error": self.error,
        }


# -- formatting ------------------------------------------------------------------------------

_HEADER = ("", "scenario", "measure", "cdc-sync", "native", "cdc/native", "target", "result")


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    digits = {"s": 2, "ms": 1, "MB": 0}.get(unit, 2)
    return f"{value:.{digits}f} {unit}"


def _rows(results: Sequence[ScenarioResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in results:
        sc = r.scenario
        if r.error is not None:
            verdict = "ERROR"
        else:
            verdict = {True: "ok", False: "MISSED", None: "n/a"}[r.passed]
        ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}"
        rows.append((sc.key, sc.title, sc.metric, _value(r.cdc_sync, sc.unit),
                     _value(r.native, sc.unit), ratio, sc.target.describe(sc.unit), verdict))
    return rows


def _notes(results: Sequence[ScenarioResult]) -> list[str]:
    notes = []
    for r in results:
        if r.error is not None:
            notes.append(f"({r.scenario.key}) error: {r.error}")
        summary = r.details.get("summary")
        if summary:
            notes.append(f"({r.scenario.key}) {summary}")
    return notes


def text_table(results: Sequence[ScenarioResult]) -> str:
    rows = [_HEADER, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", *_notes(results)]
    return "\n".join(lines).rstrip() + "\n"


def markdown_table(results: Sequence[ScenarioResult], meta: dict[str, Any]) -> str:
    lines = [
        "# cdc-sync vs. native logical replication",
        "",
        f"{meta['date']} · {meta['server']} · {meta['cpus']} CPUs · "
        f"median of {meta['repetitions']} repetition(s) · load average "
        f"{meta['load_average']['start']} → {meta['load_average']['end']}",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join("---" for _ in _HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    notes = _notes(results)
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def write_results(results: Sequence[ScenarioResult], meta: dict[str, Any],
                  directory: Path) -> tuple[Path, Path]:
    """Write ``latest.json`` and ``latest.md`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "latest.json", directory / "latest.md"
    data = {**meta, "scenarios": [r.to_json() for r in results]}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown_table(results, meta))
    return json_path, md_path
