"""The Grafana dashboard (docker/grafana/dashboards) and what its PromQL names: the
series (sample names as the exposition writes them: ``x_bucket``, ``x_total``), the label
matchers on each, and the labels it groups by. tests/unit/test_dashboards.py checks them
against the families api/metrics.py declares; tests/integration/test_dashboards.py
against a live stack's /metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DASHBOARD = DASHBOARDS / "laneway.json"
PROVISIONING = GRAFANA / "provisioning"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"

# labels Prometheus itself adds to every scraped series
TARGET_LABELS = frozenset({"job", "instance"})
# sample names of each family type, as the text exposition writes them
# (not `_created`: the API's processes add up their metrics without it)
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "untyped": ("",),
    "info": ("_info",),
}

AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
    | {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})

_TOKEN = re.compile(
    r"""(?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<braces>\{(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`|[^{}"'`])*\})
    |(?P<range>\[[^\[\]]*\])
    |(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    |(?P<variable>\$\{[^}]*\}|\$\w+)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<other>.)""",
    re.VERBOSE | re.DOTALL,
)
_MATCHER = re.compile(
    r"""\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*
    (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)\s*,?""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    @property
    def literal(self) -> bool:
        """An equality with a fixed value (no dashboard variable in it)."""
        return self.op == "=" and "$" not in self.value

    def matches_any(self, values: Iterable[str]) -> bool:
        """Whether a positive matcher with a fixed value (``=``, ``=~``) selects one of
        ``values``; true for the others (negative, or with a dashboard variable)."""
        if "$" in self.value or self.op not in ("=", "=~"):
            return True
        if self.op == "=":
            return self.value in values
        pattern = re.compile(self.value)  # PromQL anchors its regular expressions
        return any(pattern.fullmatch(v) for v in values)


@dataclass(frozen=True)
class Selector:
    """One series selector: ``name{label op "value", ...}``."""

    name: str
    matchers: tuple[Matcher, ...] = ()


@dataclass(frozen=True)
class Query:
    """What one PromQL expression names."""

    expr: str
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]  # labels of by/without/on/ignoring/group_* clauses

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.selectors)


class PromQLError(ValueError):
    """An expression this reader cannot make sense of."""


def _unquote(text: str) -> str:
    body = text[1:-1]
    return body if text[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def parse_matchers(braces: str) -> tuple[Matcher, ...]:
    """``{a="x", b=~"y"}`` -> its matchers."""
    inner, pos, out = braces[1:-1], 0, []
    while inner[pos:].strip():
        m = _MATCHER.match(inner, pos)
        if m is None:
            raise PromQLError(f"cannot read label matchers {braces!r}")
        out.append(Matcher(m["label"], m["op"], _unquote(m["value"])))
        pos = m.end()
    return tuple(out)


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "", m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]


def parse(expr: str) -> Query:
    """The selectors and grouping labels of a PromQL expression (Grafana's variables
    such as ``$model`` or ``[$__rate_interval]`` may appear in strings and ranges)."""
    tokens = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in GROUPING:
            if after[1] == "(":  # by (le, model)
                j = i + 2
                while j < len(tokens) and tokens[j][1] != ")":
                    if tokens[j][0] == "ident":
                        grouping.add(tokens[j][1])
                    j += 1
                i = j + 1
                continue
        elif kind == "ident" and (after[1] == "(" or text in AGGREGATIONS | KEYWORDS):
            pass  # a function, an aggregation (`sum by (...) (...)`) or an operator word
        elif kind == "ident":
            matchers = parse_matchers(after[1]) if after[0] == "braces" else ()
            selectors.append(Selector(text, matchers))
        elif kind == "braces":
            previous = tokens[i - 1][0] if i else ""
            if previous != "ident":  # {__name__="x", ...}: a selector without a bare name
                matchers = parse_matchers(text)
                names = [m.value for m in matchers if m.label == "__name__" and m.op == "="]
                if len(names) != 1:
                    raise PromQLError(f"a selector without a metric name in {expr!r}")
                rest = tuple(m for m in matchers if m.label != "__name__")
                selectors.append(Selector(names[0], rest))
        i += 1
    if not selectors:
        raise PromQLError(f"no series in {expr!r}")
    return Query(expr, tuple(selectors), frozenset(grouping))


_LABEL_VALUES = re.compile(r"label_values\(\s*(?P<metric>.+?)\s*,\s*(?P<label>\w+)\s*\)")


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, Query, str]]:
    """(variable name, the series query, the label it lists) of each Prometheus query
    variable (``label_values(metric, label)``)."""
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        m = _LABEL_VALUES.fullmatch(text.strip())
        if m is None:
            raise PromQLError(f"variable {var.get('name')}: unsupported query {text!r}")
        yield var["name"], parse(m["metric"]), m["label"]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, Query]]:
    """(where, query) of every panel target and query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('id')} ({panel.get('title')}) {target.get('refId')}"
            yield where, parse(target["expr"])
    for name, query, _ in variable_queries(dashboard):
        yield f"variable ${name}", query


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


# --- what /metrics exports ---------------------------------------------------------------------


@dataclass
class Exported:
    """Sample names with the labels (and values) seen on them."""

    labels: dict[str, dict[str, set[str]]]  # sample name -> label -> values

    @classmethod
    def from_families(cls, families: Iterable[Metric]) -> Exported:
        labels: dict[str, dict[str, set[str]]] = {}
        for family in families:
            for sample in family.samples:
                seen = labels.setdefault(sample.name, {})
                for key, value in sample.labels.items():
                    seen.setdefault(key, set()).add(value)
        return cls(labels)

    @classmethod
    def from_text(cls, text: str) -> Exported:
        from prometheus_client.parser import text_string_to_metric_families

        return cls.from_families(text_string_to_metric_families(text))


def declared_series(families: Iterable[Metric]) -> frozenset[str]:
    """The sample names families of these names and types are written as, with or
    without samples (``laneway_forward_batch_size`` -> ``..._bucket``, ``_sum``, ...)."""
    return frozenset(f.name + suffix for f in families for suffix in SUFFIXES[f.type])


def laneway_families() -> list[Metric]:
    """Every family the API's /metrics can serve (api/metrics.py), samples or not: the
    request metrics and the scrape-time collectors, as fresh instances (empty)."""
    from api.metrics import ERRORS, REQUEST_LATENCY, BrokerGauges, WorkerStatsCollector

    return [
        *REQUEST_LATENCY.describe(),
        *ERRORS.describe(),
        *BrokerGauges().collect(),
        *WorkerStatsCollector().collect(),
    ]


def live_problems(queries: Iterable[tuple[str, Query]], exported: Exported) -> list[str]:
    """Each selector names a series the scrape has, with the labels it matches on; each
    literal equality matcher matches a value seen; grouping labels exist on the query's
    series (or are the target labels Prometheus adds)."""
    problems = []
    for where, query in queries:
        available = set(TARGET_LABELS)
        for selector in query.selectors:
            seen = exported.labels.get(selector.name)
            if seen is None:
                problems.append(f"{where}: {selector.name} is not in /metrics")
                continue
            available |= seen.keys()
            for m in selector.matchers:
                if m.label not in seen and m.label not in TARGET_LABELS:
                    problems.append(f"{where}: {selector.name} has no label {m.label!r}")
                elif m.label in seen and not m.matches_any(seen[m.label]):
                    problems.append(
                        f"{where}: no {selector.name} sample has {m.label}{m.op}{m.value!r} "
                        f"(seen: {sorted(seen[m.label])})"
                    )
        missing = query.grouping - available
        if missing and all(s.name in exported.labels for s in query.selectors):
            problems.append(f"{where}: groups by {sorted(missing)}, no label of its series")
    return problems
