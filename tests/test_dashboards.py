"""The Grafana dashboards: valid, agreeing with the catalogue, and every query working on real data.

Two halves:

- **Structure** (no services): each ``dashboards/*.json`` parses, panel ids are unique, the
  grid stays inside 24 columns without overlaps, every ``$var`` is defined, every panel,
  target, variable and annotation goes through the ``${datasource}`` variable, and every
  measurement, field and tag an InfluxQL query names exists in ``agent/catalogue.py`` (a
  small InfluxQL parser, enough for our own queries, follows sub-queries). The provisioning
  files parse and point where the README says, and the README lists every panel.
- **Queries on real data**: mosquitto, influxd and the real collector are started once for
  the module; two hubs' worth of realistic envelopes (a power cut with the charge falling,
  a reboot, an uplink drop, an ongoing power cut, agents going dark) go through MQTT into
  InfluxDB, and the collector's own outage engine derives the outages from them. Every panel
  query, expanded exactly as Grafana expands it
  (``tests/grafana_macros.py``), must run without error and return the series its panel
  shows; key panels are checked for the values a user would read off them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from agent import wire
from agent.catalogue import COMMON_TAGS, MEASUREMENTS, OUTAGE_KINDS, check_sample
from agent.wire import Sample
from tests import grafana_macros as gm
from tests.collector_harness import envelope, start_collector, wait_for
from tests.services.influx import InfluxServer
from tests.services.common import ServiceFactory
from tests.services.mosquitto import MosquittoBroker

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = REPO / "dashboards"
PROVISIONING = DASHBOARD_DIR / "provisioning"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
#: Where the README tells an operator to copy the JSON files; the dashboards provider reads it.
GRAFANA_DASHBOARD_PATH = "/var/lib/grafana/dashboards/hubwatch"
DATASOURCE_REF = {"type": "influxdb", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat", "table", "state-timeline", "bargauge", "row"}
#: Grafana's own variables: allowed without a templating entry.
BUILTIN_VARIABLES = {"timeFilter", "interval", "__interval", "__interval_ms", "__from", "__to", "__range",
                     "__range_s", "__range_ms", "__value", "__url_time_range", "__data", "__field", "__series",
                     "__dashboard", "__org", "__user", "__timezone"}
#: Alias patterns of the InfluxDB data source (only meaningful in a target's ``alias``).
ALIAS_PATTERN = re.compile(r"^(col|m|measurement|tag_\w+)$")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def iter_panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


@dataclass(frozen=True)
class Query:
    """One InfluxQL text a dashboard sends, and where it lives."""

    where: str
    text: str
    panel: dict | None = None
    target: dict | None = None


def iter_queries(dashboard: dict) -> Iterator[Query]:
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield Query(f"variable ${var['name']}", text)
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            yield Query(f"annotation {annotation['name']!r}", annotation["query"])
    for panel in iter_panels(dashboard):
        for t in panel.get("targets", []):
            yield Query(f"panel {panel['id']} {panel['title']!r} {t['refId']}", t["query"], panel, t)


# --- a small InfluxQL parser, good enough for our own queries ---------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<ident>"(?:[^"\\]|\\.)*")
  | (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\])
  | (?P<duration>\d+(?:ns|ms|u|µ|s|m|h|d|w)(?![\w.]))
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>=~|!~|!=|<>|<=|>=|::|[=<>+\-*/%(),;.])
""", re.X)


@dataclass(frozen=True)
class Token:
    kind: str  # ident, string, regex, var, duration, number, word, op
    text: str

    @property
    def name(self) -> str:
        """An identifier's name (quotes removed) or a word."""
        if self.kind == "ident":
            return self.text[1:-1].replace('\\"', '"')
        return self.text

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text.upper() in words


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "/" and tokens and tokens[-1].text in ("=~", "!~"):
            end = pos + 1
            while end < len(text) and text[end] != "/":
                end += 2 if text[end] == "\\" else 1
            tokens.append(Token("regex", text[pos:end + 1]))
            pos = end + 1
            continue
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"cannot read InfluxQL at {text[pos:pos + 30]!r}")
        if match.lastgroup != "ws":
            tokens.append(Token(match.lastgroup, match.group(0)))
        pos = match.end()
    return tokens


#: Functions that reduce a series (after them only the GROUP BY tags remain).
AGGREGATES = {"COUNT", "DISTINCT", "INTEGRAL", "MEAN", "MEDIAN", "MODE", "SPREAD", "STDDEV", "SUM", "BOTTOM",
              "FIRST", "LAST", "MAX", "MIN", "PERCENTILE", "SAMPLE", "TOP"}
#: Functions InfluxDB only computes on numbers.
NUMERIC_ONLY = {"MEAN", "MEDIAN", "SPREAD", "STDDEV", "SUM", "INTEGRAL", "PERCENTILE", "DERIVATIVE",
                "NON_NEGATIVE_DERIVATIVE", "DIFFERENCE", "NON_NEGATIVE_DIFFERENCE", "MOVING_AVERAGE",
                "CUMULATIVE_SUM", "ELAPSED"}
_NOT_IDENTIFIERS = {"AS", "AND", "OR", "TRUE", "FALSE", "NULL", "NONE", "PREVIOUS", "LINEAR", "NOW", "TIME", "TAG",
                    "FIELD"}


@dataclass
class Select:
    columns: list[str | None]           # output column names, in order
    select_refs: list[tuple[str, str | None]]  # (identifier, innermost function)
    where_refs: list[str]
    group_tags: list[str]
    groups_by_time: bool
    sources: list["str | Select"]
    aggregate: bool
    functions: set[str] = field(default_factory=set)


def _split_depth0(tokens: list[Token], sep: str = ",") -> list[list[Token]]:
    parts, depth, current = [], 0, []
    for tok in tokens:
        if tok.text == "(":
            depth += 1
        elif tok.text == ")":
            depth -= 1
        if depth == 0 and tok.kind == "op" and tok.text == sep:
            parts.append(current)
            current = []
        else:
            current.append(tok)
    parts.append(current)
    return parts


def _references(tokens: list[Token]) -> Iterator[tuple[str, str | None]]:
    """Identifiers in an expression, each with the function it is an argument of."""
    stack: list[str | None] = []
    for i, tok in enumerate(tokens):
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        previous = tokens[i - 1] if i else None
        if tok.text == "(":
            fn = previous.text.upper() if previous is not None and previous.kind == "word" else None
            stack.append(fn)
        elif tok.text == ")":
            stack.pop()
        elif previous is not None and previous.text == "::":
            continue  # a type cast: "hub"::tag
        elif tok.kind == "ident" or (tok.kind == "word" and tok.text.upper() not in _NOT_IDENTIFIERS
                                     and not (following is not None and following.text == "(")):
            yield tok.name, next((f for f in reversed(stack) if f), None)


def parse_select(tokens: list[Token], i: int = 0) -> tuple[Select, int]:
    """Parse ``SELECT ... FROM ... [WHERE] [GROUP BY] [ORDER BY] [LIMIT]`` starting at ``tokens[i]``;
    stops at the ``)`` closing a sub-query, at ``;`` or at the end."""
    assert tokens[i].is_word("SELECT"), f"expected SELECT, got {tokens[i].text!r}"
    i += 1

    def clause(stop_words: tuple[str, ...]) -> list[Token]:
        nonlocal i
        out, depth = [], 0
        while i < len(tokens):
            tok = tokens[i]
            if depth == 0 and (tok.text in (")", ";") or (tok.kind == "word" and tok.text.upper() in stop_words)):
                break
            depth += tok.text == "("
            depth -= tok.text == ")"
            out.append(tok)
            i += 1
        return out

    select_tokens = clause(("FROM",))
    assert i < len(tokens) and tokens[i].is_word("FROM"), "SELECT without FROM"
    i += 1
    sources: list[str | Select] = []
    while True:
        if tokens[i].text == "(":
            sub, i = parse_select(tokens, i + 1)
            assert tokens[i].text == ")", "unclosed sub-query"
            i += 1
            sources.append(sub)
        else:
            name = tokens[i].name
            i += 1
            while i < len(tokens) and tokens[i].text == ".":  # "policy"."measurement"
                name = tokens[i + 1].name
                i += 2
            sources.append(name)
        if i < len(tokens) and tokens[i].text == ",":
            i += 1
            continue
        break
    where_tokens: list[Token] = []
    group_tokens: list[Token] = []
    while i < len(tokens) and tokens[i].text not in (")", ";"):
        tok = tokens[i]
        if tok.is_word("WHERE"):
            i += 1
            where_tokens = clause(("GROUP", "ORDER", "LIMIT", "SLIMIT", "OFFSET", "SOFFSET", "TZ", "FILL"))
        elif tok.is_word("GROUP"):
            i += 2  # GROUP BY
            group_tokens = clause(("ORDER", "LIMIT", "SLIMIT", "OFFSET", "SOFFSET", "TZ"))
        else:
            i += 1  # fill(...) outside GROUP BY, ORDER BY time DESC, LIMIT n, tz('...')

    columns, select_refs, functions = [], [], set()
    for expr in _split_depth0(select_tokens):
        alias = None
        if len(expr) >= 2 and expr[-2].is_word("AS"):
            alias, expr = expr[-1].name, expr[:-2]
        refs = list(_references(expr))
        select_refs += refs
        functions |= {t.text.upper() for j, t in enumerate(expr[:-1]) if t.kind == "word" and expr[j + 1].text == "("}
        if alias is None and len(expr) == 1 and expr[0].kind in ("ident", "word"):
            alias = expr[0].name
        elif alias is None and expr and expr[0].kind == "word" and expr[1].text == "(" and expr[-1].text == ")":
            alias = expr[0].text.lower()
        columns.append(alias)
    group_tags, by_time = [], False
    for part in _split_depth0(group_tokens):
        if part and part[0].is_word("TIME"):
            by_time = True
        elif part and part[0].kind == "ident":
            group_tags.append(part[0].name)
        elif part and part[0].is_word("FILL"):
            pass
        # "GROUP BY time(...) fill(...)" has no comma before fill: the time part swallowed it
    where_refs = [name for name, _ in _references(where_tokens)]
    return Select(columns, select_refs, where_refs, group_tags, by_time, sources,
                  aggregate=bool(functions & AGGREGATES), functions=functions), i


def parse(text: str) -> Select:
    tokens = tokenize(text)
    select, end = parse_select(tokens)
    assert end == len(tokens), f"unexpected text after the query: {' '.join(t.text for t in tokens[end:])}"
    return select


def tags_of(measurement: str) -> set[str]:
    spec = MEASUREMENTS[measurement]
    return set(COMMON_TAGS) | set(spec.tags) | set(spec.optional_tags)


ALL_TAGS = set().union(*(tags_of(m) for m in MEASUREMENTS))


def tags_out(select: Select) -> set[str]:
    """Tags a query's result still carries (what an outer query may use)."""
    if select.aggregate:
        return set(select.group_tags)
    out: set[str] = set()
    for source in select.sources:
        out |= tags_of(source) if isinstance(source, str) and source in MEASUREMENTS else (
            tags_out(source) if isinstance(source, Select) else set())
    return out


def catalogue_problems(select: Select, where: str) -> list[str]:
    """Every measurement, field and tag the query names that the catalogue does not know."""
    problems: list[str] = []
    measurements = [s for s in select.sources if isinstance(s, str)]
    subqueries = [s for s in select.sources if isinstance(s, Select)]
    for sub in subqueries:
        problems += catalogue_problems(sub, where + " (sub-query)")
    for m in measurements:
        if m not in MEASUREMENTS:
            problems.append(f"{where}: measurement {m!r} is not in the catalogue")
    known = [m for m in measurements if m in MEASUREMENTS]
    if measurements and not known:
        return problems
    if known:
        fields = {f: spec for m in known for f, spec in MEASUREMENTS[m].fields.items()}
        tags = set().union(*(tags_of(m) for m in known))
        for name, fn in select.select_refs:
            if name not in fields and name not in tags:
                problems.append(f"{where}: {name!r} is not a field or tag of {'/'.join(known)}")
            elif fn in NUMERIC_ONLY and name in fields and fields[name].type not in ("float", "int"):
                problems.append(f"{where}: {fn.lower()}() of {name!r}, a {fields[name].type} field")
        for name in select.where_refs:
            if name not in fields and name not in tags:
                problems.append(f"{where}: WHERE names {name!r}, not a field or tag of {'/'.join(known)}")
    else:
        columns = {c for sub in subqueries for c in sub.columns if c}
        tags = set().union(*(tags_out(sub) for sub in subqueries))
        for name, _ in select.select_refs:
            if name not in columns and name not in tags:
                problems.append(f"{where}: {name!r} is not a column or tag of its sub-query")
        for name in select.where_refs:
            if name not in columns and name not in tags:
                problems.append(f"{where}: WHERE names {name!r}, not a column or tag of its sub-query")
    for tag in select.group_tags:
        if tag not in tags:
            problems.append(f"{where}: GROUP BY {tag!r}, not a tag here")
    return problems


_SHOW_TAG_VALUES = re.compile(r'^SHOW TAG VALUES(?: FROM "(?P<m>\w+)")? WITH KEY = "(?P<key>\w+)"'
                              r'(?: WHERE (?P<where>.*))?$')


def show_tag_values_problems(text: str, where: str) -> list[str]:
    match = _SHOW_TAG_VALUES.match(text)
    if not match:
        return [f"{where}: {text!r} is not SHOW TAG VALUES [FROM \"m\"] WITH KEY = \"tag\" [WHERE ...]"]
    problems = []
    m = match.group("m")
    tags = ALL_TAGS
    if m is not None:
        if m not in MEASUREMENTS:
            return [f"{where}: measurement {m!r} is not in the catalogue"]
        tags = tags_of(m)
    if match.group("key") not in tags:
        problems.append(f"{where}: key {match.group('key')!r} is not a tag")
    for name, _ in _references(tokenize(match.group("where") or "")):
        if name not in tags:
            problems.append(f"{where}: WHERE names {name!r}, not a tag")
    return problems


def query_problems(query: Query) -> list[str]:
    if query.text.lstrip().upper().startswith("SHOW"):
        return show_tag_values_problems(query.text.strip(), query.where)
    try:
        return catalogue_problems(parse(query.text), query.where)
    except (AssertionError, ValueError, IndexError) as exc:
        return [f"{query.where}: cannot parse {query.text!r}: {exc}"]


def test_the_parser_follows_sub_queries_and_catches_unknown_names():
    ok = parse('SELECT count("x") AS "n" FROM (SELECT last("on_battery") AS "x" FROM "ups" '
               'WHERE "hub" =~ /^$hub$/ AND $timeFilter GROUP BY "hub") WHERE "x" = true')
    assert ok.columns == ["n"] and isinstance(ok.sources[0], Select)
    assert catalogue_problems(ok, "q") == []
    bad = parse('SELECT mean("status"), last("charge") FROM "ups" WHERE "colour" = \'red\' GROUP BY "planet"')
    problems = "\n".join(catalogue_problems(bad, "q"))
    assert "mean() of 'status', a str field" in problems and "'charge' is not a field" in problems
    assert "WHERE names 'colour'" in problems and "GROUP BY 'planet'" in problems
    assert catalogue_problems(parse('SELECT "y" FROM (SELECT last("load1") AS "x" FROM "system")'), "q")
    assert catalogue_problems(parse('SELECT "a" FROM "nowhere"'), "q") == [
        "q: measurement 'nowhere' is not in the catalogue"]


# --- structure ----------------------------------------------------------------------------

def test_there_are_the_four_dashboards():
    assert [p.name for p in DASHBOARD_FILES] == ["collector-health.json", "fleet-overview.json", "hub-detail.json",
                                                 "outages.json"]
    uids = [load(p)["uid"] for p in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids), uids


@pytest.fixture(params=DASHBOARD_FILES, ids=lambda p: p.stem)
def dashboard(request) -> dict:
    return load(request.param)


def test_dashboard_is_current_schema_with_unique_panel_ids(dashboard):
    assert dashboard["schemaVersion"] >= 36 and dashboard["title"] and dashboard["uid"].startswith("hubwatch-")
    panels = list(iter_panels(dashboard))
    assert panels, "no panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), f"two panels share a title: {sorted(titles)}"
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, f"panel {panel['id']}: type {panel['type']!r}"
        assert panel["title"], f"panel {panel['id']} has no title"
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), f"panel {panel['title']!r}: duplicate refIds {refs}"
        if panel["type"] != "row":
            assert refs, f"panel {panel['title']!r} has no query"


def test_grid_is_within_24_columns_and_panels_do_not_overlap(dashboard):
    boxes = []
    for panel in dashboard["panels"]:  # a collapsed row's panels are laid out when it opens
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, f"{panel['title']!r}: {g}"
        assert g["x"] + g["w"] <= 24, f"{panel['title']!r} reaches column {g['x'] + g['w']} (> 24)"
        boxes.append((panel["title"], g))
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1:]:
            overlap = (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
                       and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])
            assert not overlap, f"{title_a!r} {a} overlaps {title_b!r} {b}"


def test_every_variable_used_is_defined(dashboard):
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    undefined = []
    for panel in iter_panels(dashboard):
        without_aliases = json.loads(json.dumps(panel))
        for t in without_aliases.get("targets", []):
            alias = t.pop("alias", "")
            undefined += [(panel["title"], "alias", n) for n in gm.variable_names(alias)
                          if n not in defined and n not in BUILTIN_VARIABLES and not ALIAS_PATTERN.match(n)]
        undefined += [(panel["title"], "panel", n) for n in gm.variable_names(json.dumps(without_aliases))
                      if n not in defined and n not in BUILTIN_VARIABLES]
    for q in iter_queries(dashboard):
        undefined += [(q.where, "query", n) for n in gm.variable_names(q.text)
                      if n not in defined and n not in BUILTIN_VARIABLES]
    assert not undefined, f"variables used but not in templating.list: {undefined}"
    # a variable's own query may only use variables defined before it (Grafana resolves in order)
    seen: set[str] = set()
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            used = gm.variable_names(var["query"]) - BUILTIN_VARIABLES
            assert used <= seen, f"${var['name']} uses {used - seen} before they are defined"
        seen.add(var["name"])


def test_every_query_goes_through_the_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds is not None and ds["type"] == "datasource" and ds["query"] == "influxdb", \
        "needs a variable 'datasource' of type datasource with query influxdb"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE_REF, f"${var['name']}: datasource {var['datasource']}"
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == DATASOURCE_REF, f"annotation {annotation['name']!r}"
    for panel in iter_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, f"panel {panel['title']!r}: {panel['datasource']}"
        for t in panel["targets"]:
            assert t.get("datasource", DATASOURCE_REF) == DATASOURCE_REF, f"{panel['title']!r} {t['refId']}"
            assert t.get("rawQuery") is True and t.get("query"), f"{panel['title']!r} {t['refId']}: not raw InfluxQL"
            assert t.get("resultFormat") in ("time_series", "table"), f"{panel['title']!r} {t['refId']}"


def test_every_measurement_field_and_tag_named_is_in_the_catalogue(dashboard):
    problems = [p for q in iter_queries(dashboard) for p in query_problems(q)]
    assert not problems, "\n".join(problems)


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROVISIONING / "alerting" / "hubwatch-rules.yaml").read_text())["groups"]
            for rule in group["rules"]]


def test_provisioning_files_parse_and_point_at_the_dashboards():
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "hubwatch.yaml").read_text())
    assert datasources["apiVersion"] == 1
    [influx] = datasources["datasources"]
    assert influx["type"] == "influxdb" and influx["access"] == "proxy" and influx["url"] == "http://localhost:8086"
    assert influx["jsonData"]["dbName"] == influx["database"] == "hubwatch"
    assert influx["jsonData"].get("version", "InfluxQL") == "InfluxQL"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "hubwatch.yaml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == GRAFANA_DASHBOARD_PATH
    readme = (DASHBOARD_DIR / "README.md").read_text()
    assert GRAFANA_DASHBOARD_PATH in readme, "the README must say where to copy the dashboards"
    for rule in alert_rules():
        assert rule["condition"] in {d["refId"] for d in rule["data"]}, rule["title"]
        for d in rule["data"]:
            assert d["datasourceUid"] in (influx["uid"], "__expr__"), f"{rule['title']} {d['refId']}"
            if d["datasourceUid"] == influx["uid"]:
                problems = query_problems(Query(f"alert {rule['title']!r} {d['refId']}", d["model"]["query"]))
                assert not problems, problems


def test_readme_lists_every_panel():
    readme = (DASHBOARD_DIR / "README.md").read_text()
    sections = re.split(r"^## ", readme, flags=re.M)
    for path in DASHBOARD_FILES:
        d = load(path)
        section = next((s for s in sections if s.startswith(d["title"])), None)
        assert section is not None, f"README has no '## {d['title']}' section"
        assert path.name in section, f"the {d['title']!r} section should name {path.name}"
        missing = [p["title"] for p in iter_panels(d) if f"**{p['title']}**" not in section]
        assert not missing, f"README's {d['title']!r} section does not list {missing}"


# --- queries on real data -------------------------------------------------------------------

HUB_A, HUB_B = "gilgit-sco-01", "skardu-stp-02"
SECOND = 10**9
CYCLE = 10 * SECOND
HISTORY_CYCLES = 540  # 90 minutes of 10 s cycles
LAST_A = -31  # gilgit's agents' last cycle: they go dark ~5 minutes before the end
RANGE = "3h"


@dataclass
class Scenario:
    """Two hubs over the last 90 minutes, as their agents would have reported them.

    - gilgit-sco-01: gw01 (UPS 'hubups' on NUT) and lab07. A power blip at -80 min (one
      sample on battery); a
      power cut from -60 to -35 min, UPS on battery with the charge falling to ~40%, the
      uplink down with it, the outbox filling then draining; lab07 (no UPS) dies with the
      mains and reboots at -35 min. At -5 min both agents lose their connection (Last Will):
      the hub is dark now.
    - skardu-stp-02: gw01 (UPS 'parkups' over SNMP). Uplink down from -80 to -70 min, one
      SNMP probe timeout, and a power cut since -10 min that is still going on.
    """

    t0: int  # ns, the scenario's "now"
    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)  # (hub, host, kind)

    def add(self, hub: str, host: str, sample: Sample, kind: str = "metrics") -> None:
        self.samples.setdefault((hub, host, kind), []).append(sample)

    @classmethod
    def build(cls, t0: int) -> "Scenario":
        s = cls(t0)
        rx_a, tx_a, rx_lab, rx_b, tx_b = 10**9, 2 * 10**8, 5 * 10**6, 3 * 10**9, 4 * 10**8
        outbox = 0
        charge_a, charge_b = 100.0, 100.0
        lab_boot = None
        gw_uptime0 = 5 * 86400.0
        for i in range(-HISTORY_CYCLES, 1):
            t = t0 + i * CYCLE
            ts = t / SECOND
            # --- gilgit-sco-01 / gw01 ---------------------------------------------------
            if i <= LAST_A:
                cut = -360 <= i < -210
                blip = i == -480
                on_battery = cut or blip
                if cut:
                    charge_a = 100.0 - 0.4 * (i + 361)
                elif i >= -210:
                    charge_a = min(100.0, charge_a + 0.2)
                ups = {"battery_charge_percent": round(charge_a, 1),
                       "battery_runtime_seconds": round(charge_a / 100 * 2400, 1),
                       "battery_voltage_volts": 27.2 if not on_battery else 24.0 + charge_a / 50,
                       "input_voltage_volts": 0.0 if on_battery else 228.0 + (i % 7),
                       "output_voltage_volts": 230.0, "load_percent": 35.0 + (i % 5),
                       "temperature_celsius": 31.0,
                       "status": "OB DISCHRG" if on_battery else ("OL CHRG" if charge_a < 100 else "OL"),
                       "on_line": not on_battery, "on_battery": on_battery, "low_battery": False,
                       "charging": not on_battery and charge_a < 100, "discharging": on_battery}
                s.add(HUB_A, "gw01", Sample("ups", t, {"ups": "hubups", "source": "nut"}, ups),
                      "events" if on_battery else "metrics")
                rx_a += (1_000 if cut else 250_000) * 10
                tx_a += (500 if cut else 62_500) * 10
                s.add(HUB_A, "gw01", Sample("net", t, {"iface": "eth0"},
                                            {"rx_bytes_total": rx_a, "tx_bytes_total": tx_a, "link_up": True,
                                             "speed_mbps": 1000.0}))
                up = gw_uptime0 + (i + HISTORY_CYCLES) * 10
                s.add(HUB_A, "gw01", Sample("system", t, {}, {"uptime_seconds": up, "boot_time_seconds": ts - up,
                                                              "cpu_percent": 12.0, "memory_used_percent": 41.0,
                                                              "load1": 0.3, "disk_used_percent": 23.0}))
                internet = ({"loss_percent": 100.0, "reachable": False, "method": "icmp", "error": "timeout"}
                            if cut else {"rtt_avg_ms": 80.0 + (i % 9), "rtt_min_ms": 75.0, "rtt_max_ms": 95.0,
                                         "loss_percent": 0.0, "reachable": True, "method": "icmp"})
                s.add(HUB_A, "gw01", Sample("ping", t, {"target": "internet", "address": "1.1.1.1"}, internet))
                s.add(HUB_A, "gw01", Sample("ping", t, {"target": "gateway", "address": "192.168.1.1"},
                                            {"rtt_avg_ms": 1.2, "rtt_min_ms": 0.9, "rtt_max_ms": 1.8,
                                             "loss_percent": 0.0, "reachable": True, "method": "icmp"}))
                outbox = outbox + 6 if cut else max(0, outbox - 40)
                s.add(HUB_A, "gw01", Sample("agent", t, {}, {
                    "outbox_samples": float(outbox), "outbox_messages": float(outbox // 6),
                    "outbox_bytes": 32768.0 + outbox * 180, "dropped_samples_total": 0,
                    "messages_published_total": i + HISTORY_CYCLES, "mqtt_connected": not cut,
                    "clock_trusted": True}))
            # --- gilgit-sco-01 / lab07: no UPS, dark during the cut, reboots after it -----
            if i <= LAST_A and not -360 <= i < -210:
                if i < -360:
                    up = 2 * 86400.0 + (i + HISTORY_CYCLES) * 10
                else:
                    lab_boot = lab_boot or ts - 40.0
                    up = ts - lab_boot
                    rx_lab = 50_000 * 10 if i == -210 else rx_lab
                s.add(HUB_A, "lab07", Sample("system", t, {}, {"uptime_seconds": up, "boot_time_seconds": ts - up,
                                                               "cpu_percent": 30.0, "memory_used_percent": 55.0}))
                rx_lab += 50_000 * 10
                s.add(HUB_A, "lab07", Sample("net", t, {"iface": "eth0"}, {"rx_bytes_total": rx_lab,
                                                                           "tx_bytes_total": rx_lab // 10}))
                s.add(HUB_A, "lab07", Sample("ping", t, {"target": "internet", "address": "1.1.1.1"},
                                             {"rtt_avg_ms": 82.0, "loss_percent": 0.0, "reachable": True}))
                s.add(HUB_A, "lab07", Sample("agent", t, {}, {"outbox_samples": 0.0, "outbox_messages": 0.0}))
            # --- skardu-stp-02 / gw01 ------------------------------------------------------
            cut_b = i >= -60
            if cut_b:
                charge_b = 100.0 - 0.3 * (i + 61)
            s.add(HUB_B, "gw01", Sample("ups", t, {"ups": "parkups", "source": "snmp"}, {
                "battery_charge_percent": round(charge_b, 1), "battery_runtime_seconds": round(charge_b * 30, 1),
                "input_voltage_volts": 0.0 if cut_b else 221.0, "output_voltage_volts": 229.0,
                "load_percent": 22.0, "status": "OB" if cut_b else "OL", "on_line": not cut_b,
                "on_battery": cut_b}), "events" if cut_b else "metrics")
            uplink_down = -480 <= i < -420
            rx_b += (0 if uplink_down else 125_000) * 10
            tx_b += (0 if uplink_down else 25_000) * 10
            s.add(HUB_B, "gw01", Sample("net", t, {"iface": "wlan0"}, {"rx_bytes_total": rx_b, "tx_bytes_total": tx_b,
                                                                       "link_up": True}))
            up_b = 86400.0 + (i + HISTORY_CYCLES) * 10
            s.add(HUB_B, "gw01", Sample("system", t, {}, {"uptime_seconds": up_b, "boot_time_seconds": ts - up_b}))
            s.add(HUB_B, "gw01", Sample("ping", t, {"target": "internet", "address": "8.8.8.8"},
                                        {"loss_percent": 100.0, "reachable": False} if uplink_down else
                                        {"rtt_avg_ms": 140.0, "loss_percent": 0.0 if i % 13 else 33.3,
                                         "reachable": True}))
            s.add(HUB_B, "gw01", Sample("ping", t, {"target": "gateway", "address": "10.0.0.1"},
                                        {"rtt_avg_ms": 2.5, "loss_percent": 0.0, "reachable": True}))
            s.add(HUB_B, "gw01", Sample("agent", t, {}, {"outbox_samples": 0.0 if not uplink_down else 300.0,
                                                         "outbox_messages": 0.0, "probe_errors_total": int(i > -180)}))
            if i == -100:
                s.add(HUB_A, "gw01", Sample("agent", t, {"probe": "nut"}, {
                    "error": "connection refused by 127.0.0.1:3493", "error_kind": "connection_refused"}))
            if i == -180:
                s.add(HUB_B, "gw01", Sample("agent", t, {"probe": "snmp_ups"}, {
                    "error": "no answer from 10.0.0.50:161 within 2s", "error_kind": "timeout"}))
        return s


def test_the_scenario_agrees_with_the_catalogue():
    scenario = Scenario.build(1_795_000_000 * SECOND)
    problems = [(s.measurement, p) for samples in scenario.samples.values() for s in samples
                for p in check_sample(s.measurement, s.tags, s.fields)]
    assert not problems, problems[:5]


#: (hub, host, kind, ongoing) of every outage the collector's engine derives from the scenario.
EXPECTED_OUTAGES = sorted([
    (HUB_A, "gw01", "power", False),      # the 10 s blip at -80 min
    (HUB_A, "gw01", "power", False),      # the cut, -60 to -35 min
    (HUB_A, "gw01", "uplink", False),     # internet unreachable during the cut
    (HUB_A, "gw01", "hub_dark", True),    # silent since -5 min, then its Last Will
    (HUB_A, "lab07", "host_down", False),  # dead during the cut (no UPS)
    (HUB_A, "lab07", "reboot", False),    # came back with a new boot time
    (HUB_A, "lab07", "host_down", True),  # silent since -5 min, then its Last Will
    (HUB_B, "gw01", "uplink", False),     # -80 to -70 min
    (HUB_B, "gw01", "power", True),       # since -10 min
])


def outage_keys(influx) -> list[tuple]:
    rows = influx.rows('SELECT "ongoing" FROM "outage" GROUP BY "hub", "host", "kind"', db="hubwatch")
    return sorted((r["hub"], r["host"], r["kind"], r["ongoing"]) for r in rows)


def outage_seconds(pipeline, hub: str, kind: str) -> float:
    """Seconds lost to ``kind`` outages (power: blips excluded) as the engine stored them."""
    rows = pipeline.influx.rows(f'SELECT "duration_seconds", "blip" FROM "outage" WHERE "hub" = \'{hub}\' '
                                f'AND "kind" = \'{kind}\'', db=pipeline.db)
    return sum(r["duration_seconds"] for r in rows if not r.get("blip"))


@dataclass
class Pipeline:
    influx: InfluxServer
    db: str
    scenario: Scenario
    collector: Any


BATCH_SAMPLES = 200  # about 30 cycles of one agent, as the agent batches them


def publish_scenario(broker, scenario: Scenario) -> None:
    """Every sample through MQTT as the agents send them (batched, seq per host, events apart),
    statuses last; waits until the collector has acknowledged every message."""
    expected: dict[tuple[str, str], set[int]] = {}
    seqs: dict[tuple[str, str], int] = {}
    messages = []
    for (hub, host, kind), samples in scenario.samples.items():
        for start in range(0, len(samples), BATCH_SAMPLES):
            messages.append((samples[start].time_ns, hub, host, kind, samples[start:start + BATCH_SAMPLES]))
    messages.sort(key=lambda m: m[0])
    with broker.subscriber("hubwatch/v1/+/+/ack") as acks, broker.client() as agent:
        for _, hub, host, kind, batch in messages:
            seq = seqs[(hub, host)] = seqs.get((hub, host), 0) + 1
            expected.setdefault((hub, host), set()).add(seq)
            rc = agent.publish(wire.topic("hubwatch", hub, host, kind), envelope(hub, host, seq, batch))
            assert not rc.is_failure, rc
        # two messages the collector must refuse: a payload claiming another hub, a reserved measurement
        agent.publish(wire.topic("hubwatch", HUB_A, "gw01", "metrics"),
                      envelope(HUB_B, "gw01", 999, [Sample("system", scenario.t0, {}, {"uptime_seconds": 1.0})]))
        seq = seqs[(HUB_A, "gw01")] = seqs[(HUB_A, "gw01")] + 1
        expected[(HUB_A, "gw01")].add(seq)
        agent.publish(wire.topic("hubwatch", HUB_A, "gw01", "metrics"),
                      envelope(HUB_A, "gw01", seq, [Sample("outage", scenario.t0, {"kind": "power"},
                                                           {"duration_seconds": 1.0})]))
        for hub, host, state in [(HUB_A, "gw01", "online"), (HUB_A, "lab07", "online"), (HUB_B, "gw01", "online"),
                                 (HUB_A, "gw01", "offline"), (HUB_A, "lab07", "offline")]:
            agent.publish(wire.topic("hubwatch", hub, host, "status"), wire.encode_status(state), retain=True)
        acked: dict[tuple[str, str], set[int]] = {}

        def all_acked() -> bool:
            for message in acks.messages(timeout=0.5):
                where = wire.parse_topic("hubwatch", message.topic)
                for first, last in wire.decode_ack(message.payload):
                    acked.setdefault((where.hub, where.host), set()).update(range(first, last + 1))
            return all(expected[k] <= acked.get(k, set()) for k in expected)

        wait_for(all_acked, 20, "the collector's acks for every message")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Iterator[Pipeline]:
    base = tmp_path_factory.mktemp("dashboards")
    brokers = ServiceFactory(base / "mqtt", MosquittoBroker, "mosquitto")
    influx = InfluxServer(base / "influxd")
    collector = None
    try:
        broker = brokers()
        influx.start()
        # Outages are the collector's own: recompute quickly after each poke, and no periodic
        # refresh while the tests read them (hub skardu would turn dark 30 s after the scenario ends).
        collector = start_collector(base, broker, influx, extra="outages:\n  recompute_interval: 0.2s\n  refresh: 1h\n")
        scenario = Scenario.build(time.time_ns() // CYCLE * CYCLE)
        publish_scenario(broker, scenario)
        wait_for(lambda: len(influx.rows('SELECT "state" FROM "status"', db="hubwatch")) == 5, 10, "5 status points")
        rejections = 'SELECT last("rejected_total") FROM "hubwatch_collector" WHERE "reason" != \'\' GROUP BY "reason"'
        wait_for(lambda: len(influx.rows(rejections, db="hubwatch")) >= 2, 10, "rejection counters by reason")
        wait_for(lambda: outage_keys(influx) == EXPECTED_OUTAGES, 20, "the outage engine's outages")
        yield Pipeline(influx, "hubwatch", scenario, collector)
    finally:
        if collector is not None:
            collector.stop()
        influx.stop()
        brokers.close()


#: What each dashboard is looked at with in these tests.
SELECTIONS = {
    "hubwatch-fleet-overview": {"hub": "All"},
    "hubwatch-hub-detail": {"hub": HUB_A, "host": "All"},
    "hubwatch-outages": {"hub": "All", "kind": "All"},
    "hubwatch-collector-health": {"instance": "All"},
}
EXPECTED_VARIABLE_VALUES = {
    ("hubwatch-fleet-overview", "hub"): [HUB_A, HUB_B],
    ("hubwatch-hub-detail", "host"): ["gw01", "lab07"],
    ("hubwatch-outages", "kind"): list(OUTAGE_KINDS),
    ("hubwatch-collector-health", "instance"): ["c1"],
}


def time_range(now_ms: int | None = None) -> gm.TimeRange:
    return gm.TimeRange.last(RANGE, now_ms)


def resolve_variables(pipeline: Pipeline, dashboard: dict, tr: gm.TimeRange) -> dict[str, list[str] | str]:
    """Each variable's value as Grafana would hold it: its query run (with the variables before
    it), then the selection ("All" = every value)."""
    chosen = SELECTIONS[dashboard["uid"]]
    values: dict[str, list[str] | str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        if var["type"] == "query":
            text = gm.interpolate_variables(var["query"], values, tr)
            rows = pipeline.influx.rows(text, db=pipeline.db)
            options = sorted({r["value"] for r in rows})
        else:
            options = [v.strip() for v in var["query"].split(",")]
        assert options, f"variable ${var['name']} has no values"
        expected = EXPECTED_VARIABLE_VALUES.get((dashboard["uid"], var["name"]))
        if expected is not None:
            assert sorted(options) == sorted(expected), f"${var['name']} offers {options}"
        selection = chosen.get(var["name"], options[0])
        if selection == "All":
            assert var.get("includeAll"), f"${var['name']} has no All option"
            values[var["name"]] = options
        else:
            assert selection in options, f"{selection!r} not among ${var['name']} values {options}"
            values[var["name"]] = [selection] if var.get("multi") else selection
    return values


def run(pipeline: Pipeline, text: str) -> list[dict]:
    """The series a query returns (InfluxError when InfluxDB refuses it)."""
    [result] = pipeline.influx.query(text, db=pipeline.db, epoch="ms")
    return result.get("series", [])


def panel_interval_ms(panel: dict, tr: gm.TimeRange) -> int:
    # The provisioned data source's min interval is 10s; a panel may ask for more.
    return gm.calculate_interval_ms(tr, panel.get("maxDataPoints", 1000), panel.get("interval") or "10s")


TARGETS = [pytest.param(path, panel["id"], t["refId"], id=f"{path.stem}:{panel['title']}:{t['refId']}")
           for path in DASHBOARD_FILES for panel in iter_panels(load(path)) for t in panel.get("targets", [])]


def rows_of(series: list[dict]) -> list[dict]:
    out = []
    for s in series:
        for values in s.get("values", []):
            out.append({**s.get("tags", {}), **dict(zip(s["columns"], values))})
    return out


def check_shape(series: list[dict], query_text: str, where: str) -> None:
    """Non-empty, with the columns the SELECT names and exactly the GROUP BY tags."""
    assert series, f"{where}: no series for\n{query_text}"
    select = parse(query_text)
    for s in series:
        assert s["columns"][0] == "time", f"{where}: columns {s['columns']}"
        named = [c for c in select.columns if c]
        assert set(named) <= set(s["columns"]), f"{where}: columns {s['columns']}, query names {named}"
        assert set(s.get("tags", {})) == set(select.group_tags), \
            f"{where}: series tags {s.get('tags')} but GROUP BY {select.group_tags}"
        assert s.get("values"), f"{where}: a series without values"


@pytest.mark.services
@pytest.mark.parametrize("path, panel_id, ref_id", TARGETS)
def test_panel_query_returns_its_series_on_real_data(pipeline, path, panel_id, ref_id):
    dashboard = load(path)
    panel = next(p for p in iter_panels(dashboard) if p["id"] == panel_id)
    target = next(t for t in panel["targets"] if t["refId"] == ref_id)
    where = f"{dashboard['title']} / {panel['title']} / {ref_id}"
    deadline = time.monotonic() + (25 if dashboard["uid"] == "hubwatch-collector-health" else 0)
    while True:
        tr = time_range()
        variables = resolve_variables(pipeline, dashboard, tr)
        interval = panel_interval_ms(panel, tr)
        backend = gm.expand(target["query"], variables=variables, time_range=tr, interval_ms=interval)
        browser = gm.expand(target["query"], variables=variables, time_range=tr, interval_ms=interval, mode="browser")
        assert "$" not in backend.replace("$/", "/"), f"{where}: left unexpanded: {backend}"
        series = run(pipeline, backend)
        # The collector's own rates need its stats from two intervals: give it the time.
        if series or time.monotonic() > deadline:
            break
        time.sleep(1)
    check_shape(series, backend, where)
    browser_series = run(pipeline, browser)
    assert {json.dumps(s.get("tags", {}), sort_keys=True) for s in browser_series} == \
        {json.dumps(s.get("tags", {}), sort_keys=True) for s in series}, f"{where}: relative time filter differs"
    check = PANEL_CHECKS.get((dashboard["uid"], panel["title"], ref_id))
    if check is not None:
        check(rows_of(series), tr, pipeline)


@pytest.mark.services
def test_variables_offer_the_hubs_hosts_and_instances(pipeline):
    tr = time_range()
    for path in DASHBOARD_FILES:
        resolve_variables(pipeline, load(path), tr)  # asserts against EXPECTED_VARIABLE_VALUES
    detail = load(DASHBOARD_DIR / "hub-detail.json")
    host_query = next(v for v in detail["templating"]["list"] if v["name"] == "host")["query"]
    expanded = gm.interpolate_variables(host_query, {"hub": HUB_B}, tr)
    assert sorted({r["value"] for r in pipeline.influx.rows(expanded, db=pipeline.db)}) == ["gw01"]


@pytest.mark.services
def test_annotation_queries_return_the_outages(pipeline):
    detail = load(DASHBOARD_DIR / "hub-detail.json")
    [annotation] = [a for a in detail["annotations"]["list"] if not a.get("builtIn")]
    tr = time_range()
    text = gm.expand(annotation["query"], variables={"hub": HUB_A}, time_range=tr, interval_ms=10_000)
    rows = rows_of(run(pipeline, text))
    assert sorted(r[annotation["textColumn"]] for r in rows) == sorted(
        ["mains_failure", "mains_failure", "internet_unreachable", "unknown", "agent_silent", "unknown",
         "unclean_restart"])


@pytest.mark.services
def test_alert_rule_queries_find_the_ups_on_battery(pipeline):
    """Evaluated at the scenario's end: skardu-stp-02's UPS is on battery, with 41 minutes left."""
    t0_ms = pipeline.scenario.t0 // 10**6
    results = {}
    for rule in alert_rules():
        for d in rule["data"]:
            if d["datasourceUid"] == "__expr__":
                continue
            window = d["relativeTimeRange"]
            tr = gm.TimeRange(t0_ms - window["from"] * 1000, t0_ms - window["to"] * 1000 + 1)
            text = gm.expand(d["model"]["query"], variables={}, time_range=tr, interval_ms=10_000)
            results[(rule["uid"], d["refId"])] = rows_of(run(pipeline, text))
    [on_battery] = results[("hubwatch-ups-on-battery", "A")]
    assert (on_battery["hub"], on_battery["ups"]) == (HUB_B, "parkups") and on_battery["samples"] >= 2
    runtime = {r["hub"]: r["minutes_left"] for r in results[("hubwatch-ups-runtime-low", "A")]}
    assert runtime == {HUB_B: pytest.approx(81.7 * 30 / 60, abs=0.05)}  # gilgit's agents went dark 5 min earlier
    assert [r["hub"] for r in results[("hubwatch-ups-runtime-low", "B")]] == [HUB_B]


# --- what a user reads off the key panels -------------------------------------------------
# Each check gets the rows of the panel's query (tags and columns together), the time range
# it ran for, and the pipeline (to compare with the outages the engine stored).

def by(rows: list[dict], key: str) -> dict[str, dict]:
    return {r[key]: r for r in rows}


def single(column: str, expected: Any):
    def check(rows, tr, pipeline):
        assert [r[column] for r in rows] == [expected]
    return check


def keyed(key: str, column: str, expected: dict):
    def check(rows, tr, pipeline):
        assert {r[key]: r[column] for r in rows} == expected
    return check


def check_hubs_table_status(rows, tr, pipeline):
    assert {r["hub"]: r["online"] for r in rows} == {HUB_A: False, HUB_B: True}


def check_hubs_table_ups(rows, tr, pipeline):
    hubs = by(rows, "hub")
    assert hubs[HUB_A]["on_battery"] is False and hubs[HUB_B]["on_battery"] is True
    assert hubs[HUB_B]["charge"] == pytest.approx(81.7, abs=0.05)
    assert hubs[HUB_B]["minutes_left"] == pytest.approx(81.7 * 30 / 60, abs=0.05)
    assert 70 < hubs[HUB_A]["charge"] < 80  # recharging after the cut when the hub went dark


def check_hubs_table_uplink(rows, tr, pipeline):
    hubs = by(rows, "hub")
    assert hubs[HUB_A]["uplink_latency"] >= 80 and hubs[HUB_B]["uplink_latency"] == 140.0


def check_hubs_table_last_seen(rows, tr, pipeline):
    last_seen = {r["hub"]: r["last_seen"] for r in rows}
    t0_ms = pipeline.scenario.t0 // 10**6
    assert last_seen == {HUB_A: pytest.approx(t0_ms + LAST_A * 10_000, abs=1), HUB_B: pytest.approx(t0_ms, abs=1)}


def check_availability(column: str, kind: str):
    def check(rows, tr, pipeline):
        span_s = tr.span_ms // 1000
        got = {r["hub"]: r[column] for r in rows}
        lost = {hub: outage_seconds(pipeline, hub, kind) for hub in (HUB_A, HUB_B)}
        assert got == {hub: pytest.approx(100 * (1 - s / span_s), abs=1e-6) for hub, s in lost.items() if s}
    return check


def check_downtime_per_hub(rows, tr, pipeline):
    downtime = {r["hub"]: r["downtime"] for r in rows}
    assert downtime == {hub: pytest.approx(outage_seconds(pipeline, hub, "power"), abs=1e-6) for hub in (HUB_A, HUB_B)}
    assert downtime[HUB_A] == 1500 and 600 <= downtime[HUB_B] < 660  # the cut; the ongoing one so far


def check_downtime_total(rows, tr, pipeline):
    [row] = rows
    assert row["downtime"] == pytest.approx(outage_seconds(pipeline, HUB_A, "power")
                                            + outage_seconds(pipeline, HUB_B, "power"), abs=1e-6)


def check_bandwidth(rows, tr, pipeline):
    eth0 = [r for r in rows if r["host"] == "gw01" and r["iface"] == "eth0" and r["in"] is not None]
    in_rates = sorted(r["in"] for r in eth0)
    assert in_rates[len(in_rates) // 2] == pytest.approx(2_000_000, rel=0.01), "median rx rate is 2 Mbit/s"
    assert min(in_rates) == pytest.approx(8_000, rel=0.01), "8 kbit/s while the uplink was down"
    assert all(r["in"] >= 0 for r in rows), "a counter reset at reboot must not show as a negative rate"


def check_outage_table(rows, tr, pipeline):
    assert sorted((r["hub"], r["host"], r["kind"], r["ongoing"]) for r in rows) == EXPECTED_OUTAGES
    assert all((r["end"] is None) == r["ongoing"] for r in rows)
    [cut] = [r for r in rows if r["kind"] == "power" and r["hub"] == HUB_A and not r["blip"]]
    assert (cut["duration"], cut["cause"], cut["min_charge"]) == (1500, "mains_failure", 40.0)


def check_timeline_shows_the_cut(rows, tr, pipeline):
    assert {r["on_battery"] for r in rows} >= {True, False}, "the power cut is not on the timeline"


def check_lowest_charge(rows, tr, pipeline):
    assert min(r["mean"] for r in rows if r["mean"] is not None) == pytest.approx(40.0, abs=0.05)


def check_targets(rows, tr, pipeline):
    assert {(r["host"], r["target"]) for r in rows} == {("gw01", "internet"), ("gw01", "gateway"),
                                                         ("lab07", "internet")}


def check_outbox_peak(rows, tr, pipeline):
    assert max(r["samples"] or 0 for r in rows) == 900, "6 samples a cycle held for the 150 cycles of the cut"


def check_rejection_reasons(rows, tr, pipeline):
    assert {r["reason"] for r in rows} >= {"topic_mismatch", "reserved"}


PANEL_CHECKS = {
    ("hubwatch-fleet-overview", "Hubs on battery", "A"): single("hubs", 1),
    ("hubwatch-fleet-overview", "Hubs dark now", "A"): single("hubs", 1),
    ("hubwatch-fleet-overview", "Hubs reporting", "A"): single("hubs", 2),
    ("hubwatch-fleet-overview", "Ongoing outages", "A"): single("outages", 3),
    ("hubwatch-fleet-overview", "Hubs", "A"): check_hubs_table_status,
    ("hubwatch-fleet-overview", "Hubs", "B"): check_hubs_table_ups,
    ("hubwatch-fleet-overview", "Hubs", "C"): check_hubs_table_uplink,
    ("hubwatch-fleet-overview", "Hubs", "D"): check_hubs_table_last_seen,
    ("hubwatch-hub-detail", "Reboots", "A"): keyed("host", "reboots", {"lab07": 1}),
    ("hubwatch-hub-detail", "Probe errors", "A"): keyed("probe", "count", {"nut": 1}),
    ("hubwatch-hub-detail", "UPS status", "A"): check_timeline_shows_the_cut,
    ("hubwatch-hub-detail", "Battery charge", "A"): check_lowest_charge,
    ("hubwatch-hub-detail", "Bandwidth", "A"): check_bandwidth,
    ("hubwatch-hub-detail", "Latency per target", "A"): check_targets,
    ("hubwatch-hub-detail", "Outbox depth", "A"): check_outbox_peak,
    ("hubwatch-outages", "Ongoing outages", "A"): single("outages", 3),
    ("hubwatch-outages", "Outages in range", "A"): single("outages", len(EXPECTED_OUTAGES)),
    ("hubwatch-outages", "Power blips in range", "A"): single("blips", 1),
    ("hubwatch-outages", "Power downtime in range", "A"): check_downtime_total,
    ("hubwatch-outages", "Outages", "A"): check_outage_table,
    ("hubwatch-outages", "Availability per hub", "A"): keyed("hub", "power_percent", {HUB_A: 100, HUB_B: 100}),
    ("hubwatch-outages", "Availability per hub", "C"): check_availability("power_percent", "power"),
    ("hubwatch-outages", "Availability per hub", "D"): check_availability("hub_percent", "hub_dark"),
    ("hubwatch-outages", "Availability per hub", "E"): check_availability("uplink_percent", "uplink"),
    ("hubwatch-outages", "Power downtime per hub", "A"): check_downtime_per_hub,
    ("hubwatch-collector-health", "Rejected by reason", "A"): check_rejection_reasons,
}


@pytest.mark.services
def test_availability_table_after_grafanas_transformations(pipeline):
    """Merge + group by hub (min), as the panel's transformations do: every hub that reported
    gets a row, and one without outages stays at 100%."""
    outages = load(DASHBOARD_DIR / "outages.json")
    panel = next(p for p in outages["panels"] if p["title"] == "Availability per hub")
    assert [t["id"] for t in panel["transformations"]] == ["merge", "groupBy", "organize"]
    group = panel["transformations"][1]["options"]["fields"]
    tr = time_range()
    variables = resolve_variables(pipeline, outages, tr)
    merged: dict[str, dict[str, float]] = {}
    for t in panel["targets"]:
        text = gm.expand(t["query"], variables=variables, time_range=tr, interval_ms=10_000)
        for row in rows_of(run(pipeline, text)):
            for column, spec in group.items():
                if spec["operation"] == "aggregate" and row.get(column) is not None:
                    cell = merged.setdefault(row["hub"], {})
                    cell[column] = min(cell.get(column, 101.0), row[column])
    span_s = tr.span_ms / 1000

    def percent(hub, kind):
        return pytest.approx(100 * (1 - outage_seconds(pipeline, hub, kind) / span_s), abs=1e-6)

    assert merged == {hub: {"power_percent": percent(hub, "power"), "hub_percent": percent(hub, "hub_dark"),
                            "uplink_percent": percent(hub, "uplink")} for hub in (HUB_A, HUB_B)}
    assert merged[HUB_B]["hub_percent"] == 100 and 86 < merged[HUB_A]["power_percent"] < 86.2


def test_macro_expansion_matches_grafana():
    tr = gm.TimeRange(1_700_000_000_000, 1_700_021_600_000, "now-6h", "now")
    interval = gm.calculate_interval_ms(tr, 1000, "10s")
    assert interval == 20_000 and gm.format_interval(interval) == "20s"  # 21.6 s rounds to 20 s
    text = ('SELECT mean("x") FROM "ups" WHERE "hub" =~ /^$hub$/ AND "host" =~ /^${host}$/ AND $timeFilter '
            'GROUP BY time($__interval), "hub" -- $__interval_ms ${__to:date:seconds} $col $tag_hub')
    out = gm.expand(text, variables={"hub": ["gilgit-sco-01", "a.b"], "host": "gw01"}, time_range=tr,
                    interval_ms=interval)
    assert out == ('SELECT mean("x") FROM "ups" WHERE "hub" =~ /^(gilgit-sco-01|a\\.b)$/ AND "host" =~ /^gw01$/ '
                   'AND time >= 1700000000000ms and time <= 1700021600000ms GROUP BY time(20s), "hub" '
                   '-- 20000 1700021600 $col $tag_hub')
    browser = gm.expand("WHERE $timeFilter", variables={}, time_range=tr, interval_ms=interval, mode="browser")
    assert browser == "WHERE time >= now() - 6h and time <= now()"
    assert gm.format_interval(90_000) == "1m" and gm.format_interval(500) == "500ms"
    assert gm.calculate_interval_ms(gm.TimeRange(0, 7 * 86_400_000), 1000) == 600_000
