"""What the Grafana dashboards in compose/ ask the time-series store for, read from their Flux.

The dashboards are only useful if their queries name measurements and fields that the telemetry
service really writes: a renamed field leaves a panel silently empty. This module reads every
dashboard's queries and returns what they name, so that tests can check it against the catalog
(``outpost.services.telemetry.catalog.MEASUREMENTS``) and against what the service wrote to a real
server (VictoriaMetrics stores measurement ``m``, field ``f`` as the series ``m_f``:
:func:`victoria_series`).

A query is read pipeline by pipeline (each ``from(...)`` or ``schema.*(...)`` call starts one):
a pipeline names one measurement with ``r._measurement == "..."`` and its fields with
``r._field == "..."``; tags are the other ``r.<name>`` comparisons, the columns of
``group(columns: [...])`` (``_field`` and the like aside) and ``tag: "..."`` of
``schema.tagValues``. A regex or a negation on ``_measurement`` or ``_field`` is refused: what it
matches cannot be checked, so the dashboards do not use one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

DASHBOARDS = Path(__file__).resolve().parents[1] / "compose" / "grafana" / "dashboards"
"""The shipped dashboards' folder."""

_SOURCE = re.compile(r"\bfrom\s*\(|\bschema\.\w+\s*\(")
_NAMED = re.compile(
    r'r(?:\.(\w+)|\[\s*"(\w+)"\s*\])\s*(==|!=|=~|!~)\s*("(?:[^"\\]|\\.)*"|/(?:[^/\\]|\\.)*/)?'
)
_TAG_ARG = re.compile(r'\btag\s*:\s*"(\w+)"')
_GROUP = re.compile(r"\bgroup\s*\(\s*columns\s*:\s*\[([^\]]*)\]")


class DashboardError(ValueError):
    """A dashboard that cannot be read, or a query whose series cannot be told."""


@dataclass(frozen=True, slots=True)
class Query:
    """One query of a dashboard: a panel's target, or a template variable's."""

    dashboard: str  # the file's name
    where: str  # "panel 3 'Readings/s' A" or "variable site"
    text: str
    variable: bool = False


@dataclass(frozen=True, slots=True)
class Pipeline:
    """What one pipeline of a query names."""

    measurement: str | None
    fields: frozenset[str]
    tags: frozenset[str]


def load(path: Path) -> dict[str, Any]:
    """A dashboard file as a dict; DashboardError (naming the file) when it is not a JSON object."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as e:
        raise DashboardError(f"{path.name}: not readable JSON: {e}") from None
    if not isinstance(doc, dict):
        raise DashboardError(f"{path.name}: not a JSON object")
    return doc


def dashboards(folder: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` of ``folder`` by file name."""
    found = {p.name: load(p) for p in sorted(folder.glob("*.json"))}
    if not found:
        raise DashboardError(f"no dashboard (*.json) in {folder}")
    return found


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    out: list[dict[str, Any]] = []
    for p in doc.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def queries(name: str, doc: dict[str, Any]) -> list[Query]:
    """The panels' queries (rows have none) and the template variables' queries of one dashboard."""
    out: list[Query] = []
    for p in panels(doc):
        if p.get("type") == "row":
            continue
        for t in p.get("targets", []):
            where = f"panel {p.get('id')} {p.get('title')!r} {t.get('refId', '?')}"
            out.append(Query(name, where, str(t.get("query", ""))))
    for v in doc.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            text = q.get("query", "") if isinstance(q, dict) else str(q or "")
            out.append(Query(name, f"variable {v.get('name')}", text, variable=True))
    return out


def pipelines(flux: str) -> list[Pipeline]:
    """The pipelines of a Flux query and what each names (see the module's docstring)."""
    starts = [m.start() for m in _SOURCE.finditer(flux)] or [0]
    if starts[0] != 0:
        starts[0] = 0  # imports and comments before the first source belong to it
    out: list[Pipeline] = []
    for a, b in zip(starts, [*starts[1:], len(flux)], strict=True):
        part = flux[a:b]
        measurements: set[str] = set()
        fields: set[str] = set()
        tags: set[str] = set(_TAG_ARG.findall(part))
        for cols in _GROUP.findall(part):
            tags.update(c for c in re.findall(r'"(\w+)"', cols) if not c.startswith("_"))
        for m in _NAMED.finditer(part):
            column, op, value = m.group(1) or m.group(2), m.group(3), m.group(4)
            if column in ("_measurement", "_field"):
                if op != "==" or value is None or not value.startswith('"'):
                    raise DashboardError(f"{column} {op} ...: name each one with == and a string")
                (measurements if column == "_measurement" else fields).add(value[1:-1])
            elif not column.startswith("_"):
                tags.add(column)
        if len(measurements) > 1:
            raise DashboardError(f"one pipeline names {sorted(measurements)}: one measurement each")
        if fields and not measurements:
            raise DashboardError(f"fields {sorted(fields)} without a measurement")
        out.append(Pipeline(next(iter(measurements), None), frozenset(fields), frozenset(tags)))
    return out


def named(folder: Path = DASHBOARDS) -> dict[tuple[str, str], list[str]]:
    """(measurement, field) -> where it is asked for, over every panel query of every dashboard
    in ``folder``. DashboardError for a panel with no query, or a pipeline that names a
    measurement and no field (what it draws could not be checked)."""
    out: dict[tuple[str, str], list[str]] = {}
    for name, doc in dashboards(folder).items():
        for p in panels(doc):
            has_query = any(str(t.get("query", "")).strip() for t in p.get("targets", []))
            if p.get("type") != "row" and not has_query:
                raise DashboardError(f"{name}: panel {p.get('id')} {p.get('title')!r} has no query")
        for q in queries(name, doc):
            if q.variable:
                continue
            try:
                found = pipelines(q.text)
            except DashboardError as e:
                raise DashboardError(f"{name}, {q.where}: {e}") from None
            for pl in found:
                if pl.measurement is None or not pl.fields:
                    raise DashboardError(f"{name}, {q.where}: a pipeline names no measurement or no field")
                for f in pl.fields:
                    out.setdefault((pl.measurement, f), []).append(f"{name}, {q.where}")
    return out


def named_pairs(folder: Path = DASHBOARDS) -> set[tuple[str, str]]:
    """Every (measurement, field) the dashboards in ``folder`` query."""
    return set(named(folder))


def victoria_series(folder: Path = DASHBOARDS) -> set[str]:
    """The VictoriaMetrics series names (``{measurement}_{field}``) the dashboards in ``folder``
    query: each must be among what the telemetry service wrote to a real server."""
    return {f"{m}_{f}" for m, f in named_pairs(folder)}


def named_tags(folder: Path = DASHBOARDS) -> dict[str, set[str]]:
    """measurement -> the tags the queries (panels' and variables') filter or group it by."""
    out: dict[str, set[str]] = {}
    for name, doc in dashboards(folder).items():
        for q in queries(name, doc):
            for pl in pipelines(q.text):
                if pl.measurement is not None:
                    out.setdefault(pl.measurement, set()).update(pl.tags)
    return out
