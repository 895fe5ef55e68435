"""``hubwatch-report`` on a month of simulated outages for 14 hubs in a real influxd.

The command runs as users run it (the console script, in a subprocess). Its JSON is checked
against an independent computation here: every second of the window is marked down or up
in a byte array per hub and category, which shares nothing with collector/report.py's
interval arithmetic. The HTML page is rendered by Debian's headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.report_sim import DAY, GB_HUBS, SimOutage, presence_lines, simulate
from tests.services.common import free_port
from tests.services.influx import InfluxServer

REPO = Path(__file__).resolve().parent.parent
REPORT = str(Path(sys.executable).parent / "hubwatch-report")
WINDOW_START = int(datetime(2026, 3, 1, tzinfo=timezone.utc).timestamp())
WINDOW_END = WINDOW_START + 30 * DAY
FROM, TO = "2026-03-01T00:00:00Z", "2026-03-31T00:00:00Z"
OLD_HUB = "retired-hub-01"  # data a year before the window only


def iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@pytest.fixture(scope="module")
def month(tmp_path_factory):
    """influxd holding a month of outages for 14 hubs; yields (server, config path, outages)."""
    root = tmp_path_factory.mktemp("report")
    server = InfluxServer(root / "influxd").start()
    try:
        server.create_database("hubwatch")
        outages = simulate(GB_HUBS, WINDOW_START, WINDOW_END)
        lines = [o.line(WINDOW_END) for o in outages]
        lines += presence_lines(GB_HUBS, WINDOW_START - 5 * DAY, WINDOW_END)
        lines += presence_lines([OLD_HUB], WINDOW_START - 400 * DAY, WINDOW_START - 380 * DAY)
        for i in range(0, len(lines), 5000):
            server.write("hubwatch", lines[i:i + 5000])
        config = root / "collector.yaml"
        config.write_text(f"influxdb:\n  url: {server.url}\n  database: hubwatch\n")
        yield server, config, outages
    finally:
        server.stop()


def run_report(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([REPORT, "-c", str(config), *args], capture_output=True, text=True, timeout=timeout)


def month_report(config: Path, fmt: str, *extra: str) -> subprocess.CompletedProcess:
    result = run_report(config, "--from", FROM, "--to", TO, "--format", fmt, *extra)
    assert result.returncode == 0, result.stderr
    return result


# -- the independent computation --------------------------------------------------------------

def expected_hub(outages: list[SimOutage], hub: str, start: int, end: int) -> dict:
    """What the report must say about ``hub``, second by second."""
    n = end - start
    marks = {"power": bytearray(n), "hub": bytearray(n), "uplink": bytearray(n)}

    def mark(category: str, a: int, b: int) -> None:
        a, b = max(a, start) - start, min(b, end) - start
        if b > a:
            marks[category][a:b] = b"\x01" * (b - a)

    listed, blips, on_battery, charges = [], 0, [], []
    for o in outages:
        if o.hub != hub:
            continue
        o_end = end if o.end is None else o.end
        if o.start >= end or o_end <= start:
            continue
        a, b = max(o.start, start), min(o_end, end)
        if o.kind == "power":
            on_battery.append(b - a)
            if o.min_charge is not None:
                charges.append(o.min_charge)
            if o.blip:
                blips += 1
                continue
            mark("power", o.start, o_end)
        if o.kind == "hub_dark":
            mark("hub", o.start, o_end)
        if o.kind == "uplink" or (o.kind == "hub_dark" and o.cause == "uplink"):
            mark("uplink", o.start, o_end)
        listed.append((o.kind, o.host, o.ups, iso(a), None if o.end is None else iso(b), float(b - a), o.cause))
    down = {k: v.count(1) for k, v in marks.items()}
    power = marks["power"]
    failures = power.count(b"\x00\x01") + (1 if power and power[0] else 0)
    return {
        "availability": {k: 100.0 * (n - down[k]) / n for k in marks},
        "downtime": down,
        "outages": sorted(listed, key=lambda t: (t[3], t[0], t[1], t[2] or "")),
        "blips": blips,
        "mttr": down["power"] / failures if failures else None,
        "mtbf": (n - down["power"]) / failures if failures else None,
        "longest_on_battery": max(on_battery) if on_battery else None,
        "lowest_charge": min(charges) if charges else None,
    }


def outage_tuples(hub_json: dict) -> list[tuple]:
    return sorted(((o["kind"], o["host"], o["ups"], o["start"], o["end"], o["duration_seconds"], o["cause"])
                   for o in hub_json["outages"]), key=lambda t: (t[3], t[0], t[1], t[2] or ""))


def close(a: float | None, b: float | None, tolerance: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= tolerance


# -- formats -----------------------------------------------------------------------------------

def test_json_equals_an_independent_computation(month):
    _, config, outages = month
    result = month_report(config, "json")
    report = json.loads(result.stdout)
    assert (report["from"], report["to"]) == (FROM, TO)
    assert [h["hub"] for h in report["hubs"]] == sorted(GB_HUBS), "every hub with data, and only those"
    for hub in report["hubs"]:
        assert {"hub", "availability_percent", "outages", "blips", "mttr_seconds", "mtbf_seconds"} <= set(hub)
        want = expected_hub(outages, hub["hub"], WINDOW_START, WINDOW_END)
        for category in ("power", "hub", "uplink"):
            assert close(hub["availability_percent"][category], want["availability"][category], 6e-5), \
                (hub["hub"], category, hub["availability_percent"][category], want["availability"][category])
            assert hub["downtime_seconds"][category] == want["downtime"][category], (hub["hub"], category)
        assert outage_tuples(hub) == want["outages"], hub["hub"]
        assert hub["blips"] == want["blips"], hub["hub"]
        assert close(hub["mttr_seconds"], want["mttr"], 1e-3), hub["hub"]
        assert close(hub["mtbf_seconds"], want["mtbf"], 1e-3), hub["hub"]
        assert close(hub["longest_on_battery_seconds"], want["longest_on_battery"], 1e-3), hub["hub"]
        assert close(hub["lowest_battery_charge_percent"], want["lowest_charge"], 1e-9), hub["hub"]

    by_hub = {h["hub"]: h for h in report["hubs"]}
    # the power cut still going at the end of the window: no end, two hours so far
    ongoing = [o for o in by_hub[GB_HUBS[0]]["outages"] if o["ongoing"]]
    assert [(o["kind"], o["start"], o["end"], o["duration_seconds"]) for o in ongoing] == \
           [("power", iso(WINDOW_END - 7200), None, 7200.0)]
    # the dark period that began three hours before the window: clipped to its start
    [early] = [o for o in by_hub[GB_HUBS[1]]["outages"] if o["actual_start"] == iso(WINDOW_START - 3 * 3600)]
    assert (early["kind"], early["start"], early["duration_seconds"], early["cause"]) == \
           ("hub_dark", FROM, 7200.0, "uplink")
    # nothing from before the window that ended before it, nothing starting after it
    starts = [o["actual_start"] for h in report["hubs"] for o in h["outages"]]
    assert iso(WINDOW_START - 10 * DAY) not in starts and iso(WINDOW_END + 3600) not in starts
    # the quiet hub had data and no outage; two UPSes of one hub cut at once count once
    quiet = by_hub[GB_HUBS[-1]]
    assert quiet["availability_percent"] == {"power": 100.0, "hub": 100.0, "uplink": 100.0}
    assert quiet["outages"] == [] and quiet["mttr_seconds"] is None and quiet["mtbf_seconds"] is None
    two_ups = by_hub[GB_HUBS[3]]
    assert {o["ups"] for o in two_ups["outages"] if o["kind"] == "power"} == {"hubups", "labups"}
    assert two_ups["power_failures"] < two_ups["outage_counts"]["power"]
    assert "reading the outages" in result.stderr, "a month-long window gets a progress line"


def test_csv_matches_the_json(month):
    _, config, _ = month
    report = json.loads(month_report(config, "json").stdout)
    rows = list(csv.DictReader(io.StringIO(month_report(config, "csv").stdout)))
    hub_rows = {r["hub"]: r for r in rows if r["record"] == "hub"}
    assert sorted(hub_rows) == [h["hub"] for h in report["hubs"]]
    for hub in report["hubs"]:
        row = hub_rows[hub["hub"]]
        for category in ("power", "hub", "uplink"):
            assert float(row[f"{category}_availability_percent"]) == hub["availability_percent"][category]
        assert int(row["blips"]) == hub["blips"] and int(row["outages"]) == len(hub["outages"])
        for key in ("mttr_seconds", "mtbf_seconds"):
            assert (float(row[key]) if row[key] else None) == hub[key]
        listed = [(r["kind"], r["host"], r["ups"] or None, r["start"], r["end"] or None, float(r["duration_seconds"]),
                   r["cause"]) for r in rows if r["record"] == "outage" and r["hub"] == hub["hub"]]
        assert sorted(listed, key=lambda t: (t[3], t[0], t[1], t[2] or "")) == outage_tuples(hub)


def test_text_table_names_every_hub_with_its_availability(month):
    _, config, _ = month
    report = json.loads(month_report(config, "json").stdout)
    text = month_report(config, "text", "--quiet")
    assert text.stderr == "", "--quiet keeps stderr empty"
    lines = text.stdout.splitlines()
    for hub in report["hubs"]:
        [row] = [l for l in lines if l.startswith(hub["hub"] + " ")]
        shown = [float(p) for p in re.findall(r"(\d+\.\d{3})%", row)]
        wanted = [hub["availability_percent"][c] for c in ("power", "hub", "uplink")]
        assert all(abs(a - b) < 6e-4 for a, b in zip(shown, wanted, strict=True)), (row, wanted)
    assert OLD_HUB not in text.stdout


class _Dom(HTMLParser):
    """Text inside SVG <text> elements and inside table cells of the summary."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.svg_text: list[str] = []
        self.cells: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "text" in self.stack and "svg" in self.stack:
            self.svg_text.append(data.strip())
        elif "td" in self.stack:
            self.cells.append(data.strip())


def decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """A minimal PNG decoder (8-bit RGB/RGBA, not interlaced): width, height, rows, bytes/pixel."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour_type in (2, 6), header
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), width * bpp
    prev, rows = bytearray(stride), []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + (((line[i - bpp] if i >= bpp else 0) + prev[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp], prev[i], prev[i - bpp]) if i >= bpp else (0, prev[i], 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is not installed (make deps installs it)"
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=90)


def test_html_is_self_contained_and_renders_every_hub_in_chromium(month, tmp_path):
    _, config, _ = month
    page = tmp_path / "report.html"
    month_report(config, "html", "-o", str(page))
    html = page.read_text()
    assert "http://" not in html and "https://" not in html, "the page must fetch nothing"
    assert not re.search(r"<(script|link|img|iframe)\b", html), "no external resources of any kind"
    assert html.count("<svg") >= 1 + 3 * len(GB_HUBS), "availability bars and the timeline are inline SVG"

    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    assert all(url.startswith("#") for url in parsed.urls), parsed.urls
    for hub in GB_HUBS:
        assert hub in parsed.svg_text, f"{hub} missing from the timeline"
        assert hub in parsed.cells, f"{hub} missing from the availability table"

    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2000", page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows, bpp = decode_png(shot.read_bytes())
    assert (width, height) == (1400, 2000)
    colours = set()
    for row in rows[::2]:
        colours.update(row[i:i + 3] for i in range(0, len(row), bpp))
    assert len(colours) > 50, f"the screenshot looks blank ({len(colours)} colours)"
    for name, rgb in {"power outage red": (0xd6, 0x45, 0x45), "up-lane green": (0xe3, 0xf1, 0xe5),
                      "availability bar green": (0x3c, 0x8d, 0x40)}.items():
        assert bytes(rgb) in colours, f"no {name} in the screenshot"
    if os.environ.get("HUBWATCH_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, REPO / "docs" / "report-screenshot.png")


def test_hub_selection_and_output_file(month, tmp_path):
    _, config, _ = month
    out = tmp_path / "two.json"
    month_report(config, "json", "--hub", GB_HUBS[0], "--hub", f"{GB_HUBS[5]},{OLD_HUB}", "-o", str(out), "-q")
    report = json.loads(out.read_text())
    assert [h["hub"] for h in report["hubs"]] == sorted([GB_HUBS[0], GB_HUBS[5], OLD_HUB])
    retired = [h for h in report["hubs"] if h["hub"] == OLD_HUB][0]
    assert retired["outages"] == [], "a hub asked for by name is reported even without data in the window"


def test_ongoing_outage_counts_until_now_not_until_a_future_end(month, tmp_path):
    server, _, _ = month
    server.create_database("live")
    now = int(time.time())
    cut = SimOutage("live-01", "gw01", "power", now - 3600, None, "mains_failure", "hubups", 70.0)
    server.write("live", [cut.line(now - 60), *presence_lines(["live-01"], now - 7000, now, every=600)])
    config = tmp_path / "live.yaml"
    config.write_text(f"influxdb:\n  url: {server.url}\n  database: live\n")
    result = run_report(config, "--from", iso(now - 7200), "--to", iso(now + 7200), "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [hub] = report["hubs"]
    [outage] = hub["outages"]
    assert outage["end"] is None and outage["ongoing"] is True
    assert abs(outage["duration_seconds"] - 3600) < 30
    assert abs(hub["availability_percent"]["power"] - 50.0) < 0.5, "the future is not counted as up or down"
    assert report["to"] == iso(now + 7200) and report["measured_to"] < report["to"]


def test_reads_the_points_the_outage_engine_writes(month, tmp_path):
    from collector.outages import NS, Outage

    server, _, _ = month
    server.create_database("engine")
    t0 = WINDOW_START + 3600
    written = [Outage("engine-01", "gw01", "power", t0 * NS, (t0 + 180) * NS, "mains_failure", "hubups", 62.5),
               Outage("engine-01", "gw01", "power", (t0 + 600) * NS, (t0 + 610) * NS, "mains_failure", "hubups",
                      98.0, blip=True),
               Outage("engine-01", "gw01", "hub_dark", (t0 + 900) * NS, (t0 + 1200) * NS, "uplink"),
               Outage("engine-01", "gw01", "power", (WINDOW_END - 100) * NS, None, "mains_failure", "hubups")]
    server.write("engine", [o.line(WINDOW_END * NS) for o in written])
    config = tmp_path / "engine.yaml"
    config.write_text(f"influxdb:\n  url: {server.url}\n  database: engine\n")
    report = json.loads(run_report(config, "--from", FROM, "--to", TO, "--format", "json", "-q").stdout)
    [hub] = report["hubs"]
    assert [(o["kind"], o["duration_seconds"], o["cause"], o["end"] is None) for o in hub["outages"]] == [
        ("power", 180.0, "mains_failure", False), ("hub_dark", 300.0, "uplink", False),
        ("power", 100.0, "mains_failure", True)]
    assert hub["blips"] == 1 and hub["power_failures"] == 2 and hub["lowest_battery_charge_percent"] == 62.5
    assert hub["downtime_seconds"] == {"power": 280.0, "hub": 300.0, "uplink": 300.0}


# -- bad input ---------------------------------------------------------------------------------

def test_from_after_to_is_bad_usage(month):
    _, config, _ = month
    result = run_report(config, "--from", TO, "--to", FROM)
    assert result.returncode == 2
    assert "--from" in result.stderr and "must be before" in result.stderr and result.stdout == ""


def test_unknown_hub_is_bad_usage_and_named(month):
    _, config, _ = month
    result = run_report(config, "--from", FROM, "--to", TO, "--hub", GB_HUBS[0], "--hub", "atlantis-01")
    assert result.returncode == 2
    assert "unknown hub atlantis-01" in result.stderr and result.stdout == ""


def test_unreachable_influxdb_is_a_runtime_failure_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "c.yaml"
    config.write_text(f"influxdb:\n  url: {url}\n  timeout: 2s\n")
    result = run_report(config, "--from", FROM, "--to", TO)
    assert result.returncode == 1
    assert f"cannot reach InfluxDB at {url}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_database_is_a_runtime_failure(month, tmp_path):
    server, _, _ = month
    config = tmp_path / "c.yaml"
    config.write_text(f"influxdb:\n  url: {server.url}\n  database: nosuchdb\n")
    result = run_report(config, "--from", FROM, "--to", TO)
    assert result.returncode == 1 and "database not found" in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--from", "yesterday-ish", "--to", TO], "not an ISO 8601 time"),
    (["--from", FROM, "--to", TO, "--format", "pdf"], "invalid choice"),
    (["--from", FROM, "--to", TO, "--hub", "Bad Hub"], "is not a hub name"),
    (["--to", TO], "--from"),
])
def test_bad_arguments_exit_2(month, args, message):
    _, config, _ = month
    result = run_report(config, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("influxdb:\n  url: ftp://nowhere\n")
    result = run_report(config, "--from", FROM, "--to", TO)
    assert result.returncode == 2 and "influxdb.url" in result.stderr


def test_version_and_help():
    version = subprocess.run([REPORT, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("hubwatch-report ")
    helptext = subprocess.run([REPORT, "--help"], capture_output=True, text=True)
    assert helptext.returncode == 0
    for option in ("--from", "--to", "--hub", "--format", "-o", "--lookback"):
        assert option in helptext.stdout


# -- edges of the arithmetic (pure) ------------------------------------------------------------

def test_window_edges():
    from collector.report import OutageRecord, build_report

    def record(kind, start, end, **kw):
        return OutageRecord("h", "gw01", kind, float(start), None if end is None else float(end),
                            ongoing=end is None, **kw)

    records = [record("hub_dark", -50, 0), record("hub_dark", 0, 0), record("uplink", -10, 1000),
               record("power", 990, None), record("power", 100, 105, blip=True), record("reboot", 1000, 1010)]
    report = build_report(records, ["h", "idle"], 0.0, 1000.0, now=995.0)
    assert report.measured_end == 995.0
    hub, idle = report.hubs
    assert [(o.kind, o.start, o.end, o.duration_seconds) for o in hub.outages] == [
        ("hub_dark", 0.0, 0.0, 0.0), ("uplink", 0.0, 995.0, 995.0), ("power", 990.0, 995.0, 5.0)]
    assert hub.availability_percent == {"power": 100 * 990 / 995, "hub": 100.0, "uplink": 0.0}
    assert hub.blips == 1 and hub.power_failures == 1 and hub.mttr_seconds == 5.0 and hub.mtbf_seconds == 990.0
    assert idle.outages == () and idle.availability_percent["power"] == 100.0 and idle.mtbf_seconds is None
