"""Turning a :class:`~collector.report.Report` into text, CSV, JSON or a self-contained HTML page.

JSON follows the contract in DESIGN.md ("Commands"), with extra keys; the CSV is one table
whose ``record`` column says what a row is (``hub``: the summary of a hub; ``outage``: one
outage), so a spreadsheet filter on it gives either table. The HTML page fetches nothing:
its CSS is inline and its charts are inline SVG.
"""

from __future__ import annotations

import csv
import io
import json
import time
from html import escape
from typing import Callable

from collector import __version__
from collector.report import CATEGORIES, HubReport, Report, ReportOutage

FORMATS = ("text", "csv", "json", "html")
KINDS = ("power", "hub_dark", "uplink", "host_down", "reboot")
_CATEGORY_TITLES = {"power": "Power", "hub": "Hub reachable", "uplink": "Uplink"}


# -- values ------------------------------------------------------------------------------------

def iso(seconds: float | None) -> str | None:
    """``2025-03-01T14:05:07Z`` (milliseconds only when there are some)."""
    if seconds is None:
        return None
    ms = int(round(seconds * 1000))
    whole, frac = divmod(ms, 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{stamp}.{frac:03d}Z" if frac else f"{stamp}Z"


def _human_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(round(seconds)))


def human_duration(seconds: float | None) -> str:
    """``45s``, ``12m 05s``, ``3h 04m``, ``2d 03h``; ``-`` for nothing."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}%"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -- JSON --------------------------------------------------------------------------------------

def outage_dict(o: ReportOutage) -> dict:
    return {"kind": o.kind, "host": o.host, "start": iso(o.start), "end": None if o.ongoing else iso(o.end),
            "duration_seconds": round(o.duration_seconds, 3), "cause": o.cause,
            "ups": o.ups, "ongoing": o.ongoing, "actual_start": iso(o.actual_start), "actual_end": iso(o.actual_end),
            "min_battery_charge_percent": _round(o.min_battery_charge_percent, 2)}


def hub_dict(h: HubReport) -> dict:
    return {
        "hub": h.hub,
        "availability_percent": {k: _round(h.availability_percent[k], 4) for k in CATEGORIES},
        "outages": [outage_dict(o) for o in h.outages],
        "blips": h.blips,
        "mttr_seconds": _round(h.mttr_seconds, 3),
        "mtbf_seconds": _round(h.mtbf_seconds, 3),
        "downtime_seconds": {k: round(h.downtime_seconds[k], 3) for k in CATEGORIES},
        "outage_counts": {k: h.count(k) for k in KINDS},
        "power_failures": h.power_failures,
        "blip_seconds": round(h.blip_seconds, 3),
        "longest_on_battery_seconds": _round(h.longest_on_battery_seconds, 3),
        "lowest_battery_charge_percent": _round(h.lowest_battery_charge_percent, 2),
    }


def report_dict(report: Report) -> dict:
    return {"from": iso(report.start), "to": iso(report.end), "measured_to": iso(report.measured_end),
            "measured_seconds": round(report.measured_seconds, 3), "generated_at": iso(report.generated_at),
            "generator": f"hubwatch-report {__version__}", "hubs": [hub_dict(h) for h in report.hubs]}


def render_json(report: Report) -> str:
    """Compact, one hub a line (so a month of 1,000 hubs stays small yet greppable)."""
    whole = report_dict(report)
    hubs = whole.pop("hubs")
    head = json.dumps(whole, ensure_ascii=False, separators=(",", ":"))[:-1]
    body = ",\n".join(json.dumps(h, ensure_ascii=False, separators=(",", ":")) for h in hubs)
    return f'{head},"hubs":[\n{body}\n]}}\n'



# -- CSV ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("record", "hub",
               "power_availability_percent", "hub_availability_percent", "uplink_availability_percent",
               "power_downtime_seconds", "hub_downtime_seconds", "uplink_downtime_seconds",
               "outages", "power_failures", "blips", "mttr_seconds", "mtbf_seconds",
               "longest_on_battery_seconds", "lowest_battery_charge_percent",
               "kind", "host", "ups", "start", "end", "duration_seconds", "ongoing", "cause",
               "min_battery_charge_percent")


def render_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()

    def blank(v: object) -> object:
        return "" if v is None else v

    for h in report.hubs:
        d = hub_dict(h)
        row = {"record": "hub", "hub": h.hub, "outages": len(h.outages), "power_failures": h.power_failures,
               "blips": h.blips, "mttr_seconds": blank(d["mttr_seconds"]), "mtbf_seconds": blank(d["mtbf_seconds"]),
               "longest_on_battery_seconds": blank(d["longest_on_battery_seconds"]),
               "lowest_battery_charge_percent": blank(d["lowest_battery_charge_percent"])}
        for k in CATEGORIES:
            row[f"{k}_availability_percent"] = blank(d["availability_percent"][k])
            row[f"{k}_downtime_seconds"] = d["downtime_seconds"][k]
        writer.writerow(row)
        for o in d["outages"]:
            writer.writerow({"record": "outage", "hub": h.hub, "kind": o["kind"], "host": o["host"],
                             "ups": blank(o["ups"]), "start": o["start"], "end": blank(o["end"]),
                             "duration_seconds": o["duration_seconds"], "ongoing": str(o["ongoing"]).lower(),
                             "cause": blank(o["cause"]),
                             "min_battery_charge_percent": blank(o["min_battery_charge_percent"])})
    return out.getvalue()


# -- text --------------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i])
              for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def render_text(report: Report) -> str:
    lines = [f"hubwatch outage report  {_human_time(report.start)} -> {_human_time(report.end)} UTC"
             f"  ({human_duration(report.measured_seconds)} measured"
             + (f", up to {_human_time(report.measured_end)}" if report.measured_end < report.end else "")
             + f", {len(report.hubs)} hubs)", ""]
    if not report.hubs:
        return "\n".join(lines + ["no hubs"]) + "\n"
    headers = ["HUB", "POWER", "HUB UP", "UPLINK", "OUTAGES", "BLIPS", "MTTR", "MTBF", "LONGEST ON BATTERY",
               "LOWEST CHARGE"]
    rows = []
    for h in report.hubs:
        a = h.availability_percent
        lowest = h.lowest_battery_charge_percent
        rows.append([h.hub, _pct(a["power"]), _pct(a["hub"]), _pct(a["uplink"]), str(len(h.outages)), str(h.blips),
                     human_duration(h.mttr_seconds), human_duration(h.mtbf_seconds),
                     human_duration(h.longest_on_battery_seconds), "-" if lowest is None else f"{lowest:.0f}%"])
    lines += _table(headers, rows, right=set(range(1, len(headers))))
    for h in report.hubs:
        lines += ["", f"{h.hub}: {len(h.outages)} outages, {h.blips} blips"]
        if not h.outages:
            continue
        orows = [[o.kind, o.host + (f"/{o.ups}" if o.ups else ""), _human_time(o.start),
                  "ongoing" if o.ongoing else _human_time(o.end), human_duration(o.duration_seconds), o.cause or "-"]
                 for o in h.outages]
        lines += ["  " + l for l in _table(["KIND", "HOST", "START", "END", "DURATION", "CAUSE"], orows, right={4})]
    return "\n".join(lines) + "\n"


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1d2630; --muted:#5f6b76; --line:#d9dee3; --up:#e3f1e5; --bg:#ffffff; }
* { box-sizing: border-box; }
body { font: 14px/1.45 "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       background: var(--bg); margin: 0; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
.sub { color: var(--muted); margin: 0; }
table { border-collapse: collapse; }
th, td { padding: 4px 10px; text-align: left; white-space: nowrap; }
th { font-size: 12px; color: var(--muted); font-weight: 600; border-bottom: 1px solid var(--line); }
tbody tr:nth-child(even) { background: #f6f8f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.hub a { color: var(--ink); font-weight: 600; text-decoration: none; }
.bar { display: inline-flex; align-items: center; gap: 6px; font-variant-numeric: tabular-nums; }
.good { color: #1b5e20; } .fair { color: #9a6700; } .poor { color: #b3261e; font-weight: 600; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 4px 0 10px; color: var(--muted); font-size: 12px; }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
.legend i { display: inline-block; width: 14px; height: 10px; border-radius: 2px; }
svg.timeline { display: block; width: 100%; height: auto; }
svg.timeline text { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; }
details { margin: 6px 0; }
summary { cursor: pointer; font-weight: 600; }
details table { margin: 6px 0 10px 16px; font-size: 13px; }
.defs { color: var(--muted); font-size: 12.5px; max-width: 1100px; }
.defs dt { font-weight: 600; color: var(--ink); margin-top: 6px; }
.defs dd { margin: 0 0 0 14px; }
"""

_COLOURS = {
    "power": "#d64545", "blip": "#f2a7a7", "dark_uplink": "#607d8b", "dark_battery": "#6d1b1b",
    "dark_other": "#263238", "uplink": "#f08c00", "host_down": "#7e57c2", "reboot": "#1e88e5",
}
_LEGEND = [("power", "on battery (power outage)"), ("blip", "blip"),
           ("dark_uplink", "hub dark: uplink cut"), ("dark_battery", "hub dark: battery exhausted"),
           ("dark_other", "hub dark: other"), ("uplink", "uplink down"), ("host_down", "host down"),
           ("reboot", "unclean reboot")]
_LANES = ("power", "hub", "uplink", "hosts")
_LANE_LABELS = {"power": "power", "hub": "hub", "uplink": "uplink", "hosts": "hosts"}
_TICK_STEPS = [3600 * h for h in (1, 2, 3, 6, 12)] + [86400 * d for d in (1, 2, 7, 14, 28, 91, 182, 364)]


def _grade(value: float | None) -> str:
    if value is None:
        return ""
    return "good" if value >= 99.5 else "fair" if value >= 98.0 else "poor"


def _availability_bar(value: float | None) -> str:
    if value is None:
        return "-"
    width = 110
    green = max(0.0, min(width, width * value / 100.0))
    return (f'<span class="bar"><svg width="{width}" height="11" role="img" aria-label="{value:.3f}%">'
            f'<rect width="{width}" height="11" rx="2" fill="#f3c4c4"/>'
            f'<rect width="{green:.2f}" height="11" rx="2" fill="#3c8d40"/></svg>'
            f'<span class="{_grade(value)}">{value:.3f}%</span></span>')


def _anchor(hub: str) -> str:
    return "hub-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in hub)


def _outage_title(o: ReportOutage) -> str:
    end = "ongoing" if o.ongoing else _human_time(o.end)
    parts = [o.kind, f"{o.host}" + (f"/{o.ups}" if o.ups else ""),
             f"{_human_time(o.start)} → {end}", human_duration(o.duration_seconds)]
    if o.cause:
        parts.append(o.cause)
    if o.min_battery_charge_percent is not None:
        parts.append(f"lowest charge {o.min_battery_charge_percent:.0f}%")
    return " · ".join(parts)


def _lane_and_colour(o: ReportOutage) -> list[tuple[str, str]]:
    if o.kind == "power":
        return [("power", "power")]
    if o.kind == "hub_dark":
        colour = {"uplink": "dark_uplink", "battery_exhausted": "dark_battery"}.get(o.cause or "", "dark_other")
        lanes = [("hub", colour)]
        if o.cause == "uplink":
            lanes.append(("uplink", "uplink"))
        return lanes
    if o.kind == "uplink":
        return [("uplink", "uplink")]
    if o.kind in ("host_down", "reboot"):
        return [("hosts", o.kind)]
    return [("hosts", "dark_other")]


def _timeline(report: Report) -> str:
    width, x0, x1 = 1340, 200, 1300
    lane_h, lane_gap, row_pad, top = 7, 2, 11, 30
    row_h = len(_LANES) * lane_h + (len(_LANES) - 1) * lane_gap + row_pad
    height = top + row_h * len(report.hubs) + 8
    span = max(1.0, report.end - report.start)

    def x(t: float) -> float:
        return x0 + (x1 - x0) * (t - report.start) / span

    out = [f'<svg class="timeline" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="Outage timeline, one row per hub">']
    step = next((s for s in _TICK_STEPS if span / s <= 16), _TICK_STEPS[-1])
    first = (int(report.start) // step + (1 if int(report.start) % step else 0)) * step
    if step >= 86400:  # ticks at midnight UTC
        first = ((int(report.start) + 86399) // 86400) * 86400
    fmt = "%b %d" if step >= 86400 else "%d %H:%M"
    t = first
    while t <= report.end:
        xt = x(t)
        out.append(f'<line x1="{xt:.1f}" y1="{top - 6}" x2="{xt:.1f}" y2="{height - 6}" stroke="#e1e5e8"/>')
        out.append(f'<text x="{xt:.1f}" y="{top - 12}" font-size="11" fill="#5f6b76" text-anchor="middle">'
                   f'{time.strftime(fmt, time.gmtime(t))}</text>')
        t += step
    if report.measured_end < report.end:  # the future is not measured
        xm = x(report.measured_end)
        out.append(f'<rect x="{xm:.1f}" y="{top - 4}" width="{x1 - xm:.1f}" height="{height - top - 2}" '
                   f'fill="#f1f1f1"><title>not measured yet</title></rect>')
    for i, h in enumerate(report.hubs):
        y = top + i * row_h
        mid = y + (row_h - row_pad) / 2
        out.append(f'<a href="#{_anchor(h.hub)}"><text x="6" y="{mid + 4:.1f}" font-size="12.5" font-weight="600" '
                   f'fill="#1d2630">{escape(h.hub)}</text></a>')
        lane_y = {}
        for j, lane in enumerate(_LANES):
            ly = y + j * (lane_h + lane_gap)
            lane_y[lane] = ly
            out.append(f'<text x="{x0 - 6}" y="{ly + lane_h - 0.5:.1f}" font-size="7.5" fill="#8a959f" '
                       f'text-anchor="end">{_LANE_LABELS[lane]}</text>')
            end_x = x(report.measured_end)
            out.append(f'<rect x="{x0}" y="{ly}" width="{max(0.0, end_x - x0):.1f}" height="{lane_h}" '
                       f'fill="#e3f1e5"/>')
        for o in h.outages:
            title = escape(_outage_title(o))
            for lane, colour in _lane_and_colour(o):
                xa, xb = x(o.start), x(o.end)
                w = max(xb - xa, 1.2 if o.kind != "reboot" else 1.6)
                css = f"k-{colour}" + (" ongoing" if o.ongoing else "")
                out.append(f'<rect x="{xa:.1f}" y="{lane_y[lane]}" width="{w:.1f}" height="{lane_h}" '
                           f'class="{css}"><title>{title}</title></rect>')
        for start in h.blip_starts:
            out.append(f'<rect x="{x(start):.1f}" y="{lane_y["power"]}" width="1" height="{lane_h}" '
                       f'class="k-blip"><title>blip at {_human_time(start)}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


def _summary_table(report: Report) -> str:
    head = ("<tr><th>Hub</th>" + "".join(f"<th>{_CATEGORY_TITLES[k]}</th>" for k in CATEGORIES)
            + "<th>Outages</th><th>Blips</th><th>MTTR</th><th>MTBF</th><th>Longest on battery</th>"
              "<th>Lowest charge</th></tr>")
    rows = []
    for h in report.hubs:
        counts = ", ".join(f"{h.count(k)} {k}" for k in KINDS if h.count(k))
        lowest = h.lowest_battery_charge_percent
        rows.append(
            f'<tr><td class="hub"><a href="#{_anchor(h.hub)}">{escape(h.hub)}</a></td>'
            + "".join(f"<td>{_availability_bar(h.availability_percent[k])}</td>" for k in CATEGORIES)
            + f'<td class="num" title="{escape(counts)}">{len(h.outages)}</td><td class="num">{h.blips}</td>'
              f'<td class="num">{human_duration(h.mttr_seconds)}</td><td class="num">{human_duration(h.mtbf_seconds)}</td>'
              f'<td class="num">{human_duration(h.longest_on_battery_seconds)}</td>'
              f'<td class="num">{"-" if lowest is None else f"{lowest:.0f}%"}</td></tr>')
    return f'<table class="summary"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _details(report: Report) -> str:
    out = []
    for h in report.hubs:
        out.append(f'<details id="{_anchor(h.hub)}"><summary>{escape(h.hub)} — {len(h.outages)} outages, '
                   f'{h.blips} blips</summary>')
        if h.outages:
            out.append("<table><thead><tr><th>Kind</th><th>Host</th><th>Start (UTC)</th><th>End (UTC)</th>"
                       "<th>Duration</th><th>Cause</th><th>Lowest charge</th></tr></thead><tbody>")
            for o in h.outages:
                charge = o.min_battery_charge_percent
                out.append(f"<tr><td>{escape(o.kind)}</td><td>{escape(o.host + (f'/{o.ups}' if o.ups else ''))}</td>"
                           f"<td>{_human_time(o.start)}</td>"
                           f"<td>{'ongoing' if o.ongoing else _human_time(o.end)}</td>"
                           f'<td class="num">{human_duration(o.duration_seconds)}</td>'
                           f"<td>{escape(o.cause or '-')}</td>"
                           f'<td class="num">{"-" if charge is None else f"{charge:.0f}%"}</td></tr>')
            out.append("</tbody></table>")
        out.append("</details>")
    return "\n".join(out)


_DEFINITIONS = """<dl class="defs">
<dt>Availability</dt><dd>100 × (1 − downtime ÷ measured window). Outages are clipped to the window; an ongoing
outage counts up to the end of the window (or now).</dd>
<dt>Power</dt><dd>Downtime is the time any UPS of the hub was on battery (power outages, blips left out).</dd>
<dt>Hub reachable</dt><dd>Downtime is the time the hub's gateway was dark (<code>hub_dark</code>), whatever the cause.</dd>
<dt>Uplink</dt><dd>Downtime is the time every internet target was unreachable (<code>uplink</code>) plus the time
the hub was dark because its uplink was cut (<code>hub_dark</code>, cause <code>uplink</code>).</dd>
<dt>MTTR, MTBF</dt><dd>Over the hub's power failures (separate stretches of power downtime): MTTR = power
downtime ÷ failures; MTBF = (window − power downtime) ÷ failures.</dd>
<dt>Blips</dt><dd>Power outages shorter than <code>outages.min_power_s</code>: counted apart, not in the
availability or the outage list.</dd>
</dl>"""


def _colour_css() -> str:
    rules = [f".k-{key} {{ fill: {colour}; }}" for key, colour in _COLOURS.items()]
    return "\n".join(rules + [".ongoing { stroke: #000; stroke-width: 0.6; stroke-dasharray: 2 1; }"])


def render_html(report: Report) -> str:
    title = f"hubwatch outage report {_human_time(report.start)} – {_human_time(report.end)} UTC"
    legend = "".join(f'<span><i style="background:{_COLOURS[key]}"></i>{escape(text)}</span>' for key, text in _LEGEND)
    measured = human_duration(report.measured_seconds)
    note = (f", measured up to {_human_time(report.measured_end)} UTC" if report.measured_end < report.end else "")
    body = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}{_colour_css()}</style></head><body>",
        "<header><h1>Outage report</h1>",
        f'<p class="sub">{_human_time(report.start)} → {_human_time(report.end)} UTC ({measured}{note}) · '
        f"{len(report.hubs)} hubs · generated {_human_time(report.generated_at)} UTC by hubwatch-report "
        f"{escape(__version__)}</p></header>",
        "<h2>Availability</h2>", _summary_table(report) if report.hubs else "<p>No hubs.</p>",
        "<h2>Timeline</h2>",
        f'<div class="legend">{legend}<span>each hub: lanes power · hub · uplink · hosts; '
        f'green = up, dashed = ongoing</span></div>',
        _timeline(report) if report.hubs else "",
        "<h2>Outages by hub</h2>", _details(report),
        "<h2>Definitions</h2>", _DEFINITIONS,
        "</body></html>",
    ]
    return "\n".join(body) + "\n"


RENDERERS: dict[str, Callable[[Report], str]] = {
    "text": render_text, "csv": render_csv, "json": render_json, "html": render_html,
}


def render(report: Report, fmt: str) -> str:
    return RENDERERS[fmt](report)
