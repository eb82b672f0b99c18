"""What the system's own metrics said during a drill: a few key series scraped every ~10 s, kept beside gate.json.

The drill's report is the buyers' view (Locust) and the database's after the fact; this is what ops would
have seen live on the ops page or in Prometheus at each moment of the run: create-order answers by status,
429s and 503s by reason, each queue's depth and the age of its oldest message, the waiting line's length
and how fast it is admitted, stamping attempts by outcome, refunds open. It reads them the way Prometheus
does: ``GET /metrics`` on every web node (``Authorization: Bearer $OPS_TOKEN``) and on every worker node's
``METRICS_PORT``, with the standard library, parsed by prometheus-client's text parser (a small reader of
the text format stands in if that is missing).

Each scrape is one line of ``metrics.jsonl``; :func:`summarise` turns the lines into the ``metrics`` part
of gate.json. Counters are added up over the nodes (each node counts its own requests or tasks), gauges
read at scrape time (queues, line, refunds) are the same system seen by each web node, so the highest is
kept. A node killed mid-run starts counting again from zero, so totals are what the last scrape saw.

A scrape that fails is recorded in its line (``errors``) and never fails the drill.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FILE_NAME = "metrics.jsonl"
INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 5.0
CREATE_ROUTE = ("/api/v1/orders", "POST")

# One target: (name, URL, headers).
Target = tuple[str, str, dict[str, str]]
Sample = tuple[str, dict[str, str], float]

# Sections added up over the nodes; every other section keeps the highest value any node reported.
_SUMMED = frozenset({"create_orders", "refusals", "stamping_attempts", "tasks_failed"})


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition as (name, labels, value)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return _parse_plainly(text)
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _parse_plainly(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and not line.startswith("#"):
            labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group(2) or "")}
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def key_series(samples: Iterable[Sample]) -> dict[str, dict[str, float]]:
    """The few series the report keeps, from one node's samples; each section maps a label to a value."""
    out: dict[str, dict[str, float]] = {name: {} for name in (
        "create_orders", "refusals", "queue_messages", "queue_oldest_age_seconds", "line", "stamping_attempts",
        "refunds_open", "tasks_failed")}

    def add(section: str, key: str, value: float) -> None:
        out[section][key] = out[section].get(key, 0.0) + value

    for name, labels, value in samples:
        if name == "meterai_http_requests_total" and (labels.get("route"), labels.get("method")) == CREATE_ROUTE:
            add("create_orders", labels.get("status", "?"), value)
        elif name == "meterai_http_refusals_total":
            add("refusals", f"{labels.get('status', '?')}:{labels.get('reason', '?')}", value)
        elif name == "meterai_queue_messages":
            out["queue_messages"][labels.get("queue", "?")] = value
        elif name == "meterai_queue_oldest_message_age_seconds":
            out["queue_oldest_age_seconds"][labels.get("queue", "?")] = value
        elif name == "meterai_admission_line_length":
            out["line"]["length"] = value
        elif name == "meterai_admission_line_head":
            out["line"]["head"] = value
        elif name == "meterai_admission_outflow_target_per_minute":
            out["line"]["outflow_target_per_minute"] = value
        elif name == "meterai_admission_stamped_last_minute":
            out["line"]["stamped_last_minute"] = value
        elif name == "meterai_stamping_attempts_total":
            add("stamping_attempts", labels.get("outcome", "?"), value)
        elif name == "meterai_refunds_open":
            out["refunds_open"][labels.get("status", "?")] = value
        elif name == "meterai_tasks_total" and labels.get("outcome") == "failed":
            add("tasks_failed", labels.get("task", "?"), value)
    return {section: values for section, values in out.items() if values}


def merge(per_node: Iterable[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Several nodes' key series as one: counters added up, scrape-time gauges the highest seen."""
    merged: dict[str, dict[str, float]] = {}
    for series in per_node:
        for section, values in series.items():
            into = merged.setdefault(section, {})
            for key, value in values.items():
                if section in _SUMMED:
                    into[key] = into.get(key, 0.0) + value
                else:
                    into[key] = max(into.get(key, value), value)
    return merged


def scrape_once(targets: list[Target], *, started: float, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """One line of metrics.jsonl: the time, the merged key series, and which targets failed and why."""
    per_node, errors = [], {}
    for name, url, headers in targets:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as answer:
                per_node.append(key_series(parse_samples(answer.read().decode("utf-8", "replace"))))
        except urllib.error.HTTPError as exc:
            errors[name] = f"HTTP {exc.code}"
        except Exception as exc:  # noqa: BLE001 - refused, timed out, unparsable: recorded, never raised
            errors[name] = f"{type(exc).__name__}: {exc}"[:200]
    now = time.time()
    return {"t": round(now, 3), "elapsed": round(now - started, 1), "targets": len(targets),
            "answered": len(per_node), "series": merge(per_node), "errors": errors}


class Watch:
    """Scrapes ``targets()`` every ``interval`` seconds in a thread, appending a line to ``path`` each time,
    from :meth:`start` until :meth:`stop` (which scrapes once more and returns the summary)."""

    def __init__(self, path: Path, targets: Callable[[], list[Target]], interval: float = INTERVAL_SECONDS) -> None:
        self.path, self.targets, self.interval = path, targets, interval
        self.lines: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self._summary: dict[str, Any] | None = None

    def start(self) -> "Watch":
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, name="metrics-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._scrape()
            self._stop.wait(self.interval)

    def _scrape(self) -> None:
        try:
            line = scrape_once(self.targets(), started=self._started)
        except Exception as exc:  # noqa: BLE001 - e.g. the process table changing under us
            line = {"t": round(time.time(), 3), "elapsed": round(time.time() - self._started, 1), "targets": 0,
                    "answered": 0, "series": {}, "errors": {"watch": f"{type(exc).__name__}: {exc}"[:200]}}
        self.lines.append(line)
        try:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps(line, sort_keys=True) + "\n")
        except OSError:
            pass

    def stop(self) -> dict[str, Any]:
        """Stop (once; later calls return the same summary), with a last scrape."""
        if self._summary is None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=60)  # a scrape in flight: each target's at most TIMEOUT_SECONDS
            self._scrape()
            try:
                self._summary = summarise(self.lines, file_name=self.path.name)
            except Exception as exc:  # noqa: BLE001 - the report's extra, never the drill's failure
                self._summary = {"file": self.path.name, "scrapes": len(self.lines), "error": repr(exc)[:200]}
        return self._summary


def summarise(lines: list[dict[str, Any]], file_name: str = FILE_NAME) -> dict[str, Any]:
    """The ``metrics`` part of gate.json: how many scrapes (and how many failed), the peaks over the run
    and the counters as the last scrape that answered saw them."""
    answered = [line for line in lines if line.get("answered")]
    peak_depth: dict[str, float] = {}
    oldest_age: dict[str, float] = {}
    peak_line, admitted_per_minute = 0.0, 0.0
    previous: dict[str, Any] | None = None
    for line in answered:
        series = line.get("series", {})
        for queue, depth in series.get("queue_messages", {}).items():
            peak_depth[queue] = max(peak_depth.get(queue, 0.0), depth)
        for queue, age in series.get("queue_oldest_age_seconds", {}).items():
            oldest_age[queue] = max(oldest_age.get(queue, 0.0), age)
        here = series.get("line", {})
        peak_line = max(peak_line, here.get("length", 0.0))
        if previous is not None and "head" in here and "head" in previous["line"]:
            seconds = line["t"] - previous["t"]
            if seconds > 0:  # the line's outflow: how fast its head moved between two scrapes
                admitted_per_minute = max(admitted_per_minute, (here["head"] - previous["line"]["head"]) * 60 / seconds)
        previous = {"t": line["t"], "line": here}
    last = answered[-1]["series"] if answered else {}
    failed = [line for line in lines if line.get("errors")]
    return {
        "file": file_name,
        "scrapes": len(lines),
        "scrapes_with_errors": len(failed),
        "first_errors": sorted({f"{name}: {error}" for line in failed for name, error in line["errors"].items()})[:5],
        "peak_queue_depth": {q: int(v) for q, v in sorted(peak_depth.items())},
        "max_oldest_message_age_seconds": {q: round(v, 1) for q, v in sorted(oldest_age.items())},
        "peak_line_length": int(peak_line),
        "peak_admitted_per_minute": round(admitted_per_minute, 1),
        "at_end": {section: {k: int(v) if float(v).is_integer() else round(v, 1) for k, v in sorted(values.items())}
                   for section, values in sorted(last.items())},
    }


def render(summary: dict[str, Any]) -> str:
    """One line for the drill's printed report."""
    if not summary.get("scrapes"):
        return "metrics: not scraped"
    end = summary.get("at_end", {})

    def pairs(values: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in values.items()) or "-"

    depth = max(summary["peak_queue_depth"].items(), key=lambda kv: kv[1], default=("-", 0))
    age = max(summary["max_oldest_message_age_seconds"].items(), key=lambda kv: kv[1], default=("-", 0))
    depth, age = (depth if depth[1] else ("every queue", 0)), (age if age[1] else ("every queue", 0))
    return (f"metrics: {summary['scrapes']} scrapes ({summary['scrapes_with_errors']} with errors) in "
            f"{summary['file']}; peak line {summary['peak_line_length']}, admitted ≤{summary['peak_admitted_per_minute']}"
            f"/min; peak queue depth {depth[1]} ({depth[0]}), oldest message {age[1]} s ({age[0]}); create-order "
            f"{pairs(end.get('create_orders', {}))}; refusals {pairs(end.get('refusals', {}))}; stamping "
            f"{pairs(end.get('stamping_attempts', {}))}; refunds open {pairs(end.get('refunds_open', {}))}")


def stack_targets(stack: Any) -> list[Target]:
    """Every live web node's /metrics (with the stack's ops token) and every worker node's METRICS_PORT."""
    targets: list[Target] = []
    for process in list(stack.processes.values()):
        if not process.alive():
            continue
        if process.group == "web" and process.url:
            targets.append((process.name, f"{process.url}/metrics", {"Authorization": f"Bearer {stack.ops_token}"}))
        elif int(process.env.get("METRICS_PORT") or 0):
            targets.append((process.name, f"http://127.0.0.1:{process.env['METRICS_PORT']}/metrics", {}))
    return targets
