"""The dashboard's pages: server-rendered HTML fragments and plotly figures, made once per
snapshot by the poller (``render``) and shared by every page load and every stream.

A page is a frame (``page``) around its parts; the same parts travel over server-sent
events (``destra/dashboard/static/dashboard.js`` swaps the HTML in and calls
``Plotly.react`` on the figures), so the first paint and each live update show the same.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from destra.dashboard.hub import Snapshot

PAGES = {"tasks": "Tasks", "operators": "Operators", "network": "Network",
         "governance": "Governance"}

REGIONS: dict[str, tuple[float, float]] = {
    # Approximate places of the region names nodes register with (``--region``).
    "eu-west": (53.3, -6.3), "eu-central": (50.1, 8.7), "eu-north": (59.3, 18.1),
    "eu-south": (45.5, 9.2), "us-east": (38.9, -77.4), "us-west": (45.6, -122.7),
    "us-central": (41.9, -93.6), "ca-central": (45.5, -73.6), "sa-east": (-23.5, -46.6),
    "ap-east": (22.3, 114.2), "ap-south": (19.1, 72.9), "ap-southeast": (1.35, 103.8),
    "ap-northeast": (35.7, 139.7), "me-central": (25.2, 55.3), "af-south": (-33.9, 18.4),
    "au-east": (-33.9, 151.2),
}

_LAYOUT: dict[str, Any] = {
    "margin": {"l": 60, "r": 20, "t": 40, "b": 50}, "height": 320,
    "font": {"color": "#1a1a1a"}, "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
    "legend": {"orientation": "h"},
}


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    return {**_LAYOUT, "title": {"text": title}, **extra}


def when(ms: int | None) -> str:
    """A time in ms since the epoch as UTC text, '-' if none."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _t(ms: int) -> str:
    """A time for a plot's date axis (UTC, as plotly reads dates)."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _d(value: Any) -> str:
    return "-" if value is None else escape(str(value))


def _table(caption: str, head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class='empty'>{escape(empty)}</p>"
    th = "".join(f"<th scope='col'>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return (f"<div class='scroll' tabindex='0' role='region' aria-label='{escape(caption)}'>"
            f"<table><caption>{escape(caption)}</caption><thead><tr>{th}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _status(status: str) -> str:
    return f"<span class='status s-{escape(status)}'>{escape(status)}</span>"


def _task_link(task_id: str) -> str:
    return f"<a href='/tasks/{quote(task_id, safe='')}'>{escape(task_id)}</a>"


# -- tasks ----------------------------------------------------------------------------

def _replica_progress(t: dict[str, Any]) -> str:
    rows = t["replica_rows"]
    agreed = sum(r["agreed"] is True for r in rows)
    return (f"{t['assignments']}/{_d(t['replicas'])} assigned, {t['commits']} committed, "
            f"{t['reveals']} revealed, {agreed} agreed")


def _verdict(t: dict[str, Any]) -> str:
    if t["status"] == "verified":
        return f"verified <code>{escape((t['digest'] or '')[:16])}</code>"
    if t["status"] == "failed":
        return f"failed: {_d(t['failure_reason'])}"
    return "-"


def tasks_part(snap: Snapshot) -> dict[str, Any]:
    counts = snap.views.get("status_counts", {})
    summary = " ".join(f"<li>{_status(s)} <strong>{n}</strong></li>"
                       for s, n in sorted(counts.items()))
    rows = []
    for task_id in snap.recent:
        t = snap.tasks[task_id]
        rows.append([_task_link(task_id), _status(t["status"]), _d(t["workload"]),
                     _d(t["submitter_id"]), escape(_replica_progress(t)),
                     _d(t["price_micro"]), str(t["paid_micro"]), str(t["refunded_micro"]),
                     _verdict(t), when(t["submitted_at"])])
    table = _table("The newest tasks", ["task", "status", "workload", "submitter", "replicas",
                                        "quoted", "paid", "refunded", "verdict", "submitted"],
                   rows, "No tasks yet.")
    return {"html": {"task-counts": f"<ul class='counts'>{summary}</ul>",
                     "tasks-table": table}, "plots": {}}


def task_part(t: dict[str, Any]) -> dict[str, Any]:
    escrowed = t["price_micro"]
    facts = [
        ("status", _status(t["status"])), ("workload", _d(t["workload"])),
        ("params", f"<code>{escape(json.dumps(t['params'] or {}))}</code>"),
        ("submitter", _d(t["submitter_id"])),
        ("replicas / quorum", f"{_d(t['replicas'])} / {_d(t['quorum'])}"),
        ("compute units", _d(t["compute_units"])), ("tier", _d(t["tier"])),
        ("quoted (escrowed)", f"{_d(escrowed)} micro-tokens"),
        ("paid to nodes", f"{t['paid_micro']} micro-tokens"),
        ("refunded", f"{t['refunded_micro']} micro-tokens"),
        ("progress", escape(_replica_progress(t))),
        ("submitted", when(t["submitted_at"])), ("first assigned", when(t["assigned_at"])),
        ("verdict at", when(t["verified_at"])), ("verdict", _verdict(t)),
    ]
    if t["failure_reason"]:
        facts.append(("failure", f"{_d(t['failure_reason'])}: {_d(t['failure_detail'])}"))
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in facts)
    rows = []
    for r in t["replica_rows"]:
        agreed = {True: "agreed", False: "dissented", None: "-"}[r["agreed"]]
        rows.append([_d(r["replica_index"]), _d(r["node_id"]), _d(r["attempt"]),
                     when(r["assigned_at"]), when(r["committed_at"]), when(r["revealed_at"]),
                     "-" if r["runtime_ms"] is None else f"{r['runtime_ms']} ms", agreed,
                     _d(r["penalized_reason"])])
    replicas = _table("Replicas", ["replica", "node", "attempt", "assigned", "committed",
                                   "revealed", "runtime", "verdict", "penalty"],
                      rows, "No replica placed yet.")
    command = (f"destra result {t['task_id']} --account {t['submitter_id'] or 'ACCOUNT'}"
               " --out result.bin")
    result = ("<p>The result is sealed to the submitter's X25519 key, which lives in the "
              "keystore on the submitter's machine; this server never holds it and never "
              "sees the plaintext. Decrypt it below, in this browser tab, or on that machine "
              "with:</p>"
              f"<pre><code id='result-command'>{escape(command)}</code></pre>"
              if t["status"] == "verified" else
              "<p>The result can be fetched once the task is verified.</p>")
    return {"html": {"task-facts": f"<dl class='facts'>{dl}</dl>", "task-replicas": replicas,
                     "task-result": result}, "plots": {}}


# -- operators ------------------------------------------------------------------------

def operators_part(snap: Snapshot) -> dict[str, Any]:
    nodes = snap.views.get("nodes", [])
    now = snap.views.get("now", 0)
    by_region: dict[str, list[dict[str, Any]]] = {}
    for n in nodes:
        by_region.setdefault(n["region"] or "unknown", []).append(n)
    placed = [r for r in sorted(by_region) if r in REGIONS]

    def load(ns: list[dict[str, Any]]) -> float:
        loads = [n["load_permille"] for n in ns if n["load_permille"] is not None]
        return round(sum(loads) / len(loads) / 10, 1) if loads else 0.0

    world = {"data": [{
        "type": "scattergeo", "lat": [REGIONS[r][0] for r in placed],
        "lon": [REGIONS[r][1] for r in placed],
        "text": [f"{r}: {len(by_region[r])} nodes, load {load(by_region[r])} %" for r in placed],
        "hoverinfo": "text", "mode": "markers+text",
        "textposition": "top center",
        "marker": {"size": [12 + 4 * min(len(by_region[r]), 10) for r in placed],
                   "color": [load(by_region[r]) for r in placed], "cmin": 0, "cmax": 100,
                   "colorscale": "Viridis", "showscale": True,
                   "colorbar": {"title": {"text": "load %"}}}}],
        "layout": _layout("Nodes by region (colour: mean load)", geo={
            "projection": {"type": "natural earth"}, "showcountries": True,
            "lonaxis": {"range": [-180, 180]}, "lataxis": {"range": [-58, 85]},
            "showland": True, "landcolor": "#e8e8e8", "countrycolor": "#9a9a9a"})}
    regions = {"data": [{"type": "bar", "x": sorted(by_region),
                         "y": [len(by_region[r]) for r in sorted(by_region)],
                         "name": "nodes"}],
               "layout": _layout("Nodes per region")}
    bench = {"data": [{"type": "scatter", "mode": "markers",
                       "x": [(n["tflops_milli"] or 0) / 1000 for n in nodes],
                       "y": [(n["memory_mb"] or 0) / 1024 for n in nodes],
                       "text": [n["node_id"] for n in nodes], "name": "nodes"}],
             "layout": _layout("Benchmark: TFLOPS against memory",
                               xaxis={"title": {"text": "TFLOPS"}},
                               yaxis={"title": {"text": "memory (GiB)"}})}
    series: dict[str, tuple[list[int], list[int]]] = {}
    for account, bucket, amount in snap.views.get("earnings", []):
        xs, ys = series.setdefault(account.partition(":")[2], ([], []))
        xs.append(bucket)
        ys.append((ys[-1] if ys else 0) + int(amount))
    earnings = {"data": [{"type": "scatter", "mode": "lines+markers", "name": node,
                          "x": [_t(x) for x in xs], "y": ys, "line": {"shape": "hv"}}
                         for node, (xs, ys) in series.items()],
                "layout": _layout("Earnings over time (micro-tokens, top 8 earners)")}
    rows = []
    for n in nodes:
        fresh = (n["last_heartbeat_at"] is not None and now - n["last_heartbeat_at"] < 30_000)
        rows.append([
            _d(n["node_id"]), _d(n["operator_id"]), _d(n["region"]), _d(n["tier"]),
            _d(n["device_name"]),
            "-" if n["tflops_milli"] is None else f"{n['tflops_milli'] / 1000:.1f}",
            "-" if n["memory_mb"] is None else f"{n['memory_mb'] / 1024:.1f} GiB",
            ("-" if n["load_permille"] is None else f"{n['load_permille'] / 10:.0f} %")
            + ("" if fresh else " (stale)"),
            f"{_d(n['free_slots'])}/{_d(n['slots'])}", _d(n["stake_micro"]),
            str(n["tasks_agreed"]), str(n["tasks_dissented"]), str(n["penalties"]),
            str(n["earned_micro"]), str(n["slashed_micro"])])
    table = _table("Nodes", ["node", "operator", "region", "tier", "device", "TFLOPS", "memory",
                             "load", "free slots", "stake", "agreed", "dissented", "penalties",
                             "earned", "slashed"], rows, "No nodes yet.")
    return {"html": {"nodes-table": table,
                     "nodes-summary": f"<p>{len(nodes)} nodes in {len(by_region)} regions; "
                                      f"{sum(n['earned_micro'] for n in nodes)} micro-tokens "
                                      "earned in all.</p>"},
            "plots": {"plot-map": world, "plot-regions": regions, "plot-bench": bench,
                      "plot-earnings": earnings}}


# -- network --------------------------------------------------------------------------

def network_part(snap: Snapshot) -> dict[str, Any]:
    v = snap.views
    verdicts = v.get("verdicts", [])
    now = v.get("now", 0)
    last_minute = sum(n for b, n in verdicts if b >= now - 60_000)
    throughput = {"data": [{"type": "bar", "x": [_t(b) for b, _ in verdicts],
                            "y": [n / 10 for _, n in verdicts], "name": "verdicts / s",
                            "width": [9_000] * len(verdicts)}],
                  "layout": _layout("Tasks decided per second (10 s buckets, last 10 min)")}
    hops = v.get("hops") or {}
    hop_names = [h for h in hops if not h.startswith("p90") and h != "submission to verdict"]
    hop_plot = {"data": [{"type": "bar", "orientation": "h", "y": hop_names,
                          "x": [hops[h] or 0 for h in hop_names], "name": "median ms"}],
                "layout": _layout("Latency of each hop (median ms, last 1000 verdicts)",
                                  margin={"l": 170, "r": 20, "t": 40, "b": 40})}
    queue = {"data": [{"type": "scatter", "mode": "lines",
                       "x": [_t(t) for t, _ in snap.queue], "y": [d for _, d in snap.queue],
                       "name": "queued"}],
             "layout": _layout("Queue depth since this dashboard started (not yet placed)")}
    tiers: dict[str, tuple[list[str], list[int]]] = {}
    for at, tier, price in snap.prices:
        xs, ys = tiers.setdefault(tier, ([], []))
        xs.append(_t(at))
        ys.append(price)
    prices = {"data": [{"type": "scatter", "mode": "lines+markers", "name": tier, "x": xs,
                        "y": ys, "line": {"shape": "hv"}} for tier, (xs, ys) in tiers.items()],
              "layout": _layout("Price per compute unit by tier (micro-tokens)")}
    nodes = v.get("nodes", [])
    outcomes_map = {"agreed": sum(n["tasks_agreed"] for n in nodes),
                    "dissented": sum(n["tasks_dissented"] for n in nodes),
                    **{f"penalty: {k}": n for k, n in v.get("penalties", {}).items()},
                    **{f"failed: {k}": n for k, n in v.get("failures", {}).items()},
                    "disputes (referee runs)": snap.disputes}
    outcomes = {"data": [{"type": "bar", "x": list(outcomes_map),
                          "y": list(outcomes_map.values()), "name": "count"}],
                "layout": _layout("Verification outcomes")}
    runtimes = {"data": [{"type": "scatter", "mode": "markers", "name": w,
                          "x": [p["predicted_ms"] for p in snap.runtimes if p["workload"] == w],
                          "y": [p["actual_ms"] for p in snap.runtimes if p["workload"] == w]}
                         for w in sorted({p["workload"] for p in snap.runtimes})],
                "layout": _layout("Allocator: predicted against actual runtime (ms)",
                                  xaxis={"title": {"text": "predicted"}, "type": "log"},
                                  yaxis={"title": {"text": "actual"}, "type": "log"})}
    dead = _table("Dead letters (newest first)", ["at", "source", "error", "reason"],
                  [[when(d["at"]), escape(f"{d['topic']}[{d['partition']}]@{d['offset']}"),
                    _d(d["error"]), _d(d["reason"])] for d in reversed(snap.dead[-100:])],
                  "No dead letters.")
    e2e = hops.get("submission to verdict")
    p90 = hops.get("p90 submission to verdict")
    counts = v.get("status_counts", {})
    services, service_plots, money = services_part(snap.services)
    summary = (
        f"<ul class='counts'><li>verdicts in the last minute: <strong>{last_minute}</strong> "
        f"({last_minute / 60:.2f}/s)</li>"
        f"<li>queue depth: <strong>{counts.get('submitted', 0) + counts.get('escrowed', 0)}"
        "</strong></li>"
        f"<li>submission to verdict: median <strong>{_ms(e2e)}</strong>, p90 {_ms(p90)}</li>"
        f"<li>dead letters: <strong>{len(snap.dead)}</strong></li>{money}</ul>")
    return {"html": {"network-summary": summary, "dead-table": dead,
                     "services-table": services},
            "plots": {"plot-throughput": throughput, "plot-hops": hop_plot,
                      "plot-queue": queue, "plot-prices": prices, "plot-outcomes": outcomes,
                      "plot-runtimes": runtimes, **service_plots}}


def services_part(scraped: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """The services' own ``/metrics`` (``destra.dashboard.services``): their table, their
    plots (events handled per second; handler latency) and the ledger's balances."""
    rows = scraped.get("services", [])

    def rate(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    table = _table(
        "Services, from their /metrics (scraped every 2 s)",
        ["service", "pid", "up", "events handled", "per second", "handler p50",
         "handler p99", "consumer lag", "dead letters", "metrics"],
        [[_d(r["name"]), str(r["pid"]), "yes" if r["up"] else f"no: {_d(r['error'])}",
          f"{r['handled']:,.0f}", rate(r["handled_per_s"]), _ms3(r["p50_ms"]),
          _ms3(r["p99_ms"]), f"{r['lag']:,.0f}", f"{r['dead_letters']:,.0f}",
          f"<a href='{escape(r['url'], quote=True)}'>/metrics</a>"] for r in rows],
        "No service has recorded a metrics endpoint in this DESTRA_HOME.")
    busy = [r for r in rows if r["handled"]]
    plots = {
        "plot-service-rates": {
            "data": [{"type": "scatter", "mode": "lines", "name": r["name"],
                      "x": [_t(int(1000 * at)) for at, _ in r["rates"]],
                      "y": [x for _, x in r["rates"]]} for r in busy],
            "layout": _layout("Events handled per second, by service (/metrics)")},
        "plot-service-latency": {
            "data": [{"type": "bar", "name": q, "x": [r["name"] for r in busy],
                      "y": [r[key] for r in busy]}
                     for q, key in (("p50", "p50_ms"), ("p99", "p99_ms"))],
            "layout": _layout("Handler latency by service, last 2 s window (ms, /metrics)",
                              barmode="group")}}
    dead = scraped.get("dead_by_reason", {})
    if dead:
        money_dead = ", ".join(f"{escape(reason)} {n:,.0f}" for reason, n in sorted(dead.items()))
        table += f"<p>Dead letters counted by the services, by reason: {money_dead}.</p>"
    money = "".join(f"<li>{escape(account)}: <strong>{amount:,}</strong> micro-tokens "
                    "(ledger /metrics)</li>"
                    for account, amount in sorted(scraped.get("ledger_micro", {}).items()))
    return table, plots, money


def _ms3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# -- governance -----------------------------------------------------------------------

def governance_part(snap: Snapshot) -> dict[str, Any]:
    rows = [[_d(p["proposal_id"]), _d(p["title"]),
             escape(f"{p['parameter']} = {p['value']}"), _d(p["proposer"]),
             f"<span class='status s-{escape(p['state'])}'>{escape(p['state'])}</span>",
             str(p["ballots_sent"]), _d(p.get("yes_micro")), _d(p.get("no_micro")),
             _d(p.get("abstain_micro")), _d(p.get("bonded_micro")), _d(p.get("deposit")),
             _d(p.get("detail")), when(p["submitted_at"])]
            for p in reversed(snap.proposals)]
    table = _table("Proposals (newest first)",
                   ["proposal", "title", "change", "proposer", "state", "ballots", "yes",
                    "no", "abstain", "bonded", "deposit", "detail", "submitted"],
                   rows, "No proposals yet.")
    return {"html": {"proposals-table": table}, "plots": {}}


def render(snap: Snapshot, pinned: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every page part of a snapshot, by part name (``task:<id>`` for each task in memory
    whose page is open)."""
    parts = {"tasks": tasks_part(snap), "operators": operators_part(snap),
             "network": network_part(snap), "governance": governance_part(snap)}
    for task_id in pinned or []:
        if task_id in snap.tasks:
            parts[f"task:{task_id}"] = task_part(snap.tasks[task_id])
    return parts


# -- the frame ------------------------------------------------------------------------

# Outside the live parts (whose HTML the stream swaps in), so an update never clears the
# chosen file or the typed passphrase; ``decrypt.js`` shows it once the task is verified.
_DECRYPT = (
    "<section id='task-decrypt' data-task='{task_id}' aria-labelledby='decrypt-title' hidden>"
    "<h3 id='decrypt-title'>Decrypt and download</h3>"
    "<p>Decryption happens in this browser tab: the keystore file is read by the browser "
    "and never uploaded, the passphrase is never sent, and the server only hands out the "
    "sealed copies (ciphertext) the agreeing nodes revealed. The tab derives the keystore's "
    "key (scrypt), opens it (AES-256-GCM), opens the result with the account's current or "
    "retired X25519 key (X25519, HKDF-SHA256, AES-256-GCM) and checks its SHA-256 against "
    "the verified digest before saving it.</p>"
    "<form id='decrypt-form' class='decrypt'>"
    "<label for='decrypt-keystore'>Keystore file (<code>$DESTRA_HOME/accounts/"
    "ACCOUNT.json</code>)</label>"
    "<input type='file' id='decrypt-keystore' accept='.json,application/json'>"
    "<label for='decrypt-passphrase'>Passphrase</label>"
    "<input type='password' id='decrypt-passphrase' autocomplete='current-password'>"
    "<button type='submit' id='decrypt-button'>Decrypt and download</button></form>"
    "<p id='decrypt-status' role='status' aria-live='polite'></p>"
    "<p id='decrypt-saved'></p></section>")

_BODIES = {
    "tasks": "<h1>Tasks</h1><section aria-label='Counts by status' id='task-counts'></section>"
             "<section id='tasks-table'></section>",
    "task": "<h1>Task <code>{task_id}</code></h1><p><a href='/tasks'>All tasks</a></p>"
            "<section id='task-facts'></section><h2>Replicas</h2>"
            "<section id='task-replicas'></section><h2>Result</h2>"
            "<section id='task-result'></section>" + _DECRYPT,
    "operators": "<h1>Operators</h1><section id='nodes-summary'></section>"
                 "<div class='plots'><div class='plot' id='plot-map'></div>"
                 "<div class='plot' id='plot-regions'></div>"
                 "<div class='plot' id='plot-earnings'></div>"
                 "<div class='plot' id='plot-bench'></div></div>"
                 "<section id='nodes-table'></section>",
    "network": "<h1>Network</h1><section id='network-summary'></section>"
               "<div class='plots'><div class='plot' id='plot-throughput'></div>"
               "<div class='plot' id='plot-hops'></div><div class='plot' id='plot-queue'></div>"
               "<div class='plot' id='plot-prices'></div>"
               "<div class='plot' id='plot-outcomes'></div>"
               "<div class='plot' id='plot-runtimes'></div>"
               "<div class='plot' id='plot-service-rates'></div>"
               "<div class='plot' id='plot-service-latency'></div></div>"
               "<h2>Services</h2><section id='services-table'></section>"
               "<h2>Dead letters</h2><section id='dead-table'></section>",
    "governance": "<h1>Governance</h1><section id='proposals-table'></section>",
}


def page(kind: str, part_name: str, part: dict[str, Any], *, task_id: str = "",
         plots: bool = False) -> str:
    """A whole page: the navigation, the body's containers and the part that fills them;
    ``dashboard.js`` then follows ``/events/<part>``."""
    here = "tasks" if kind == "task" else kind
    nav = "".join(f"<a href='/{k}'{' aria-current=page' if k == here else ''}>{v}</a>"
                  for k, v in PAGES.items())
    body = _BODIES[kind].format(task_id=escape(task_id))
    for region, html in part.get("html", {}).items():  # rendered here; JS only updates
        body = body.replace(f"<section id='{region}'></section>",
                            f"<section id='{region}'>{html}</section>")
    title = PAGES.get(kind, "Task")
    scripts = ("<script src='/static/plotly.min.js'></script>" if plots else "")
    if kind == "task":
        scripts += ("<script src='/static/scrypt-js/scrypt.js'></script>"
                    "<script src='/static/decrypt.js'></script>")
    initial = json.dumps({"plots": part.get("plots", {})}, separators=(",", ":"),
                         default=str).replace("</", "<\\/")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)} · Destra dashboard</title>"
        "<link rel='icon' href='data:,'>"
        "<link rel='stylesheet' href='/static/dashboard.css'></head><body>"
        "<a class='skip' href='#main'>Skip to content</a>"
        f"<header><span class='brand'>Destra</span><nav aria-label='Pages'>{nav}</nav>"
        "<span id='live' role='status' aria-live='polite'>connecting…</span></header>"
        f"<main id='main' data-part='{escape(part_name, quote=True)}'>{body}</main>"
        f"<script type='application/json' id='initial'>{initial}</script>"
        f"{scripts}<script src='/static/dashboard.js'></script></body></html>")
