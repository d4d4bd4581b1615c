"""The Grafana dashboard, its provisioning and the Prometheus scrape config, without a
stack: the JSON is a Grafana dashboard, the YAML files parse and agree with each other,
and every expression names series api/metrics.py declares (tests/integration/
test_dashboards.py checks them against a live stack's /metrics)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.dashboards import (
    DASHBOARD,
    DASHBOARDS,
    PROMETHEUS_CONFIG,
    PROVISIONING,
    Exported,
    PromQLError,
    declared_series,
    expressions,
    laneway_families,
    live_problems,
    load,
    panels,
    parse,
    variable_queries,
)

DATASOURCE_VAR = "${DS_PROMETHEUS}"
# what the issue asks the dashboard to cover, by the series that show it
COVERED = {
    "latency by model": "laneway_request_duration_seconds_bucket",
    "queue wait by model (no TTFT series exists)": "laneway_queue_wait_seconds_bucket",
    "queue depth per lane": "laneway_queue_depth",
    "forward batch sizes": "laneway_forward_batch_size_bucket",
    "tokens/s": "laneway_completion_tokens_total",
    "batch progress": "laneway_batches",
    "errors by code": "laneway_errors_total",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load()


def provisioning(kind: str) -> dict[str, Any]:
    [path] = sorted((PROVISIONING / kind).glob("*.yml"))
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


# --- the dashboard -----------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "laneway"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None  # provisioned: Grafana assigns it
    every = list(panels(dashboard))
    ids = [p["id"] for p in every]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    graphs = [p for p in every if p["type"] != "row"]
    assert len(graphs) >= 7
    for panel in graphs:
        where = f"panel {panel['id']} ({panel.get('title')})"
        assert panel.get("title"), where
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_VAR}, where
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        targets = panel["targets"]
        assert targets, f"{where} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), where
        for target in targets:
            assert target["expr"].strip(), where
            assert target["datasource"]["uid"] == DATASOURCE_VAR, where


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], int] = {}
    for panel in panels(dashboard):
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    [provisioned] = provisioning("datasources")["datasources"]
    assert source["current"]["value"] == provisioned["uid"]
    model = variables["model"]
    assert model["datasource"]["uid"] == DATASOURCE_VAR
    assert model["includeAll"] and model["allValue"] == ".+"  # All: every non-empty model
    [(name, query, label)] = list(variable_queries(dashboard))
    assert (name, label) == ("model", "model") and query.names == {"laneway_workers"}
    # the per-model panels filter on it
    for _, q in expressions(dashboard):
        if "model" in q.grouping and any(n.startswith("laneway_") for n in q.names):
            values = [m.value for s in q.selectors for m in s.matchers if m.label == "model"]
            assert "$model" in values, q.expr


def test_the_dashboard_covers_the_issue(dashboard: dict[str, Any]) -> None:
    used = {name for _, q in expressions(dashboard) for name in q.names}
    missing = {what: series for what, series in COVERED.items() if series not in used}
    assert not missing, missing
    titles = " ".join(p["title"] for p in panels(dashboard))
    assert "TTFT" in titles  # the panel says plainly which series stands in for it


def test_every_expression_names_a_declared_series(dashboard: dict[str, Any]) -> None:
    declared = declared_series(laneway_families())
    problems = [
        f"{where}: {name} is no series api/metrics.py exports"
        for where, q in expressions(dashboard)
        for name in sorted(q.names)
        if name not in declared
    ]
    assert not problems, "\n".join(problems)


def test_declared_series_follow_the_exposition() -> None:
    declared = declared_series(laneway_families())
    # a Counter named *_total and a counter family named without it write the same
    assert {"laneway_errors_total", "laneway_completion_tokens_total"} <= declared
    assert "laneway_request_duration_seconds_bucket" in declared
    assert "laneway_request_duration_seconds" not in declared  # a histogram has no plain one
    assert "laneway_queue_depth" in declared and "laneway_queue_depth_total" not in declared


# --- the PromQL reader -------------------------------------------------------------------------


def test_parse_reads_selectors_matchers_and_grouping() -> None:
    q = parse(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{lane="li}ve", '
        'model=~"$model"}[$__rate_interval]))) / on(model) group_left '
        "sum without (worker) (b_total offset 5m) * 1e3 > bool 2"
    )
    assert [s.name for s in q.selectors] == ["a_bucket", "b_total"]
    [a, b] = q.selectors
    assert [(m.label, m.op, m.value) for m in a.matchers] == [
        ("lane", "=", "li}ve"),
        ("model", "=~", "$model"),
    ]
    assert a.matchers[0].literal and not a.matchers[1].literal
    assert b.matchers == ()
    assert q.grouping == {"le", "model", "worker"}
    assert parse('{__name__="c", x!="y"}').selectors[0].name == "c"
    assert parse("count(up)").names == {"up"}
    assert parse('rate(x[5m:1m]) and y{z=~"a|b"}').names == {"x", "y"}


@pytest.mark.parametrize("expr", ["sum(rate(1[5m]))", '{x="y"}', 'a{b~"c"}'])
def test_parse_refuses_what_it_cannot_read(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse(expr)


def test_live_problems_name_what_is_missing() -> None:
    exposition = (
        "# TYPE laneway_queue_depth gauge\n"
        'laneway_queue_depth{queue="embeddings.live"} 0\n'
        "# TYPE laneway_errors counter\n"
        'laneway_errors_total{route="/v1/embeddings",code="404"} 1\n'
    )
    exported = Exported.from_text(exposition)
    assert set(exported.labels) == {"laneway_queue_depth", "laneway_errors_total"}
    problems = live_problems(
        [
            ("ok", parse("sum by (queue, instance) (laneway_queue_depth)")),
            ("gone", parse("rate(laneway_completion_tokens_total[1m])")),
            ("label", parse('laneway_queue_depth{lane="live"}')),
            ("value", parse('laneway_errors_total{code="500"}')),
            ("group", parse("sum by (model) (laneway_errors_total)")),
            ("regex", parse('laneway_errors_total{route=~"/v1/embed"}')),  # anchored
            ("fine", parse('laneway_errors_total{route=~"/v1/embed.*", code!="4.."}')),
            ("var", parse('laneway_errors_total{route=~"$route"}')),
        ],
        exported,
    )
    assert [p.split(":")[0] for p in problems] == ["gone", "label", "value", "group", "regex"], (
        problems
    )


# --- provisioning and the scrape config ---------------------------------------------------------


def test_grafana_provisioning_parses() -> None:
    [source] = provisioning("datasources")["datasources"]
    assert source["type"] == "prometheus" and source["uid"]
    assert source["url"].startswith("http://")
    [provider] = provisioning("dashboards")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == [DASHBOARD.name]


def test_prometheus_config_parses() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [static] = job["static_configs"]
    assert len(static["targets"]) == 1
    # /metrics may need the key (LANEWAY_PROTECT_OPS): the scrape sends it from a file
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/")
