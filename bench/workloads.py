"""The three workload notebooks at full size against the test server, with a rule-based model.

    python bench/workloads.py                    # all three, full size (~10-20 min on 2 cores)
    python bench/workloads.py --only pii --pii-tickets 3000    # one notebook, smaller

Each notebook is executed top to bottom by nbclient (`apwa_jupyter.demo.execute`) in a real
kernel, on the default executor (a local Ray cluster), with OPENAI_BASE_URL / APWA_MODEL pointing
at the project's `FakeOpenAIServer` on 127.0.0.1, which answers every request after 1 s.

The server's answers come from a deterministic *stand-in model* (`respond`) that computes each
answer from the request alone, as a model would, and never sees the notebooks' ground truth:

- manager requests: a rule-based planner reads the request and the table metadata (the same
  message a real manager gets) and returns the plan a capable model returns for these prompts
  (`plan_for`);
- PII redaction: it calls the granted `find_pii` tool for every row of its batch, replaces what
  the tool found, then redacts by rule what regexes miss: two adjacent capitalised words not
  starting with a greeting/pronoun (a name), and a capitalised word after an address and a comma
  (a city);
- invoice fields: a rule-based extractor over the document text (JSON keys, "From:"/"Issued by"
  labels, date patterns, the amount after "total"/"amount", ISO currency codes or symbols);
- summaries: the first sentence of the passage, or the first sentence of each item of a reduce.

So the quality figures measure the pipeline end to end (planning, batching, row keys, tool
calls on the workers, retries, assembly back onto the user's rows) with a rule-based stand-in
for the model: they say nothing about any real model's quality. Results go to
bench/results/workloads.json and a markdown table (printed, and in `markdown` of the JSON).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from apwa_jupyter.testing.fake_server import (
    FakeOpenAIServer,
    Reply,
    fill_schema,
    is_manager_request,
    worker_input,
    worker_rows,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "bench" / "results" / "workloads.json"
LATENCY_S = 1.0
CONCURRENCY = 256
MODEL = "stand-in"

RULES = {
    "manager": "a rule-based planner over the request and table metadata: one map stage over "
    "the table named in the request (batch_size 20 when its text averages under 2,000 "
    "characters, else 1), outputs named from the request's words, the tools the request names; "
    "one reduce per 'for each X' / 'whole novel' clause",
    "pii": "call find_pii on every row, replace what it found, then redact by rule two adjacent "
    "capitalised words not led by a greeting or pronoun (names) and a capitalised word after "
    "'[REDACTED], ' (cities)",
    "schema": "rule-based field extractor over the document text: JSON keys when the text is "
    "JSON, else 'From:'/'Issued by'/closing-line vendor, the first date pattern, the amount after "
    "'total'/'amount', an ISO code or currency symbol",
    "book": "the first sentence of the passage; a reduce joins the first sentence of each item "
    "(up to 480 characters)",
}


# -- the stand-in model ------------------------------------------------------------------------
def respond(body: dict[str, Any]) -> Reply:
    """Answer one chat request by rule, from the request only (see the module docstring)."""
    if is_manager_request(body):
        return Reply.json(plan_for(body))
    system = next(m["content"] for m in body["messages"] if m["role"] == "system")
    fields = re.findall(r'^- "(\w+)" \((\w+)', system, re.M)
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    batched = "\nInputs:\n<data>" in user
    if any(name.startswith("redact") for name, _ in fields):
        return _redact(body, fields, batched)
    if "Inputs (" in user:  # a reduce: a list of items
        items = worker_input(body) or []
        return Reply.json(_answer(fields, {"items": items}))
    if batched:
        rows = worker_rows(body)
        return Reply.json({"results": [{"row": k} | _answer(fields, row) for k, row in rows]})
    return Reply.json(_answer(fields, worker_input(body) or {}))


def _text_of(row: dict[str, Any]) -> str:
    """The row's text: its `text` column, else its longest string value."""
    if isinstance(row.get("text"), str):
        return row["text"]
    strings = [v for v in row.values() if isinstance(v, str)]
    return max(strings, key=len) if strings else ""


def _answer(fields: list[tuple[str, str]], row: dict[str, Any]) -> dict[str, Any]:
    wanted = {name for name, _ in fields} & INVOICE_FIELDS
    invoice = extract_invoice(_text_of(row)) if wanted and "items" not in row else {}
    out: dict[str, Any] = {}
    for name, kind in fields:
        if "summary" in name:
            out[name] = summarise(row)
        elif name in invoice:
            out[name] = invoice[name]
        else:  # a field no rule knows: a valid value of its type
            schema = {"string": {"type": "string"}, "number": {"type": "number"}}.get(
                kind, {"type": kind}
            )
            out[name] = fill_schema(schema, seed=name)
    return out


SENTENCE = re.compile(r"(.+?[.!?])(?:[\"'\u201d\u2019)\]]*)(?:\s|$)", re.S)


def first_sentence(text: str, limit: int = 480) -> str:
    """The first sentence of `text` (whitespace collapsed), at most `limit` characters."""
    flat = " ".join(text.split())
    match = SENTENCE.match(flat)
    return (match.group(1) if match else flat)[:limit]


def summarise(row: dict[str, Any]) -> str:
    """A passage: its first sentence. A reduce: the first sentence of each item, up to 480 chars."""
    if "items" not in row:
        return first_sentence(_text_of(row))
    parts: list[str] = []
    for item in row["items"]:
        sentence = first_sentence(_text_of(item) if isinstance(item, dict) else str(item))
        if sum(len(p) + 1 for p in parts) + len(sentence) > 480:
            break
        parts.append(sentence)
    return " ".join(parts) or "(nothing to summarise)"


NAME = re.compile(r"\b([A-Z][a-z]+) ([A-Z][a-z]+)\b")
NOT_A_NAME = {"Hello", "Hi", "Dear", "This", "Thanks", "Please", "Regards", "Reply", "You", "My"}
CITY = re.compile(r"(?<=\[REDACTED\], )[A-Z][a-z]+")


def redact(text: str, found: list[str]) -> str:
    """What the tool found, then names and cities by rule, replaced by [REDACTED]."""
    for value in sorted(found, key=len, reverse=True):
        text = text.replace(value, "[REDACTED]")
    names = [m.group(0) for m in NAME.finditer(text) if m.group(1) not in NOT_A_NAME]
    for value in names:
        text = text.replace(value, "[REDACTED]")
    return CITY.sub("[REDACTED]", text)


def _redact(body: dict[str, Any], fields: list[tuple[str, str]], batched: bool) -> Reply:
    """First turn: call find_pii once per row. Second turn: answer from the tool results."""
    rows = worker_rows(body) if batched else [(0, worker_input(body))]
    results = {m.get("tool_call_id"): m["content"] for m in body["messages"] if m["role"] == "tool"}
    if body.get("tools") and not results:
        calls = [
            {
                "id": f"call_{k}",
                "type": "function",
                "function": {"name": "find_pii", "arguments": json.dumps({"text": row["text"]})},
            }
            for k, row in rows
        ]
        return Reply(tool_calls=calls, finish_reason="tool_calls")
    name = fields[0][0]
    answers = []
    for k, row in rows:
        try:
            found = json.loads(results.get(f"call_{k}", "[]"))
        except json.JSONDecodeError:
            found = []
        values = (
            [f["value"] for f in found if isinstance(f, dict)] if isinstance(found, list) else []
        )
        answers.append({"row": k, name: redact(row["text"], values)})
    if not batched:
        return Reply.json({name: answers[0][name]})
    return Reply.json({"results": answers})


INVOICE_FIELDS = {"vendor", "date", "total", "currency"}
ISO = {"EUR", "USD", "GBP", "JPY", "CHF", "SEK", "NOK", "DKK", "PLN", "CAD", "AUD", "CNY"}
SYMBOLS = {"€": "EUR", "$": "USD", "£": "GBP", "¥": "JPY"}
DATE_FORMATS = [
    (re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), "%Y-%m-%d"),
    (re.compile(r"\b\d{1,2} [A-Z][a-z]+ \d{4}\b"), "%d %B %Y"),
    (re.compile(r"\b[A-Z][a-z]+ \d{1,2}, \d{4}\b"), "%B %d, %Y"),
]
AMOUNT = re.compile(r"(?:total|amount)[^\d€$£¥]{0,30}([€$£¥])?\s*(\d[\d,]*(?:\.\d+)?)", re.I)
VENDOR = re.compile(r"(?:From:|Issued by|Vendor:|Seller:)\s*([^\n]+)")
CLOSING = re.compile(r"(?:regards|sincerely|thanks),?\s*\n+\s*([^\n]+)\s*$", re.I)


def extract_invoice(text: str) -> dict[str, Any]:
    """vendor, date (YYYY-MM-DD), total (number) and currency (ISO code) read from the text."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        data = None
    if isinstance(data, dict):
        return _from_json(data)
    vendor = VENDOR.search(text) or CLOSING.search(text)
    day = None
    for pattern, fmt in DATE_FORMATS:
        match = pattern.search(text)
        if match:
            try:
                day = datetime.strptime(match.group(0), fmt).date().isoformat()
                break
            except ValueError:
                continue
    amount = AMOUNT.search(text)
    codes = re.findall(r"\b[A-Z]{3}\b", text[amount.start() :] if amount else text)
    currency = next((c for c in codes if c in ISO), None)
    if currency is None and amount and amount.group(1):
        currency = SYMBOLS[amount.group(1)]
    return {
        "vendor": vendor.group(1).strip() if vendor else "",
        "date": day or "",
        "total": float(amount.group(2).replace(",", "")) if amount else 0.0,
        "currency": currency or "",
    }


def _from_json(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{path}.{key}".lower())
        else:
            flat[path] = value

    walk(data, "")
    vendor = next((v for p, v in flat.items() if re.search(r"seller|vendor|issuer|company", p)), "")
    day = next(
        (v for v in flat.values() if isinstance(v, str) and DATE_FORMATS[0][0].search(v)), ""
    )
    total = next(
        (v for p, v in flat.items() if re.search(r"total|amount", p) and _is_number(v)), 0.0
    )
    currency = next((v for p, v in flat.items() if p.endswith("currency")), "")
    return {"vendor": str(vendor), "date": day, "total": float(total), "currency": str(currency)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plan_for(body: dict[str, Any]) -> dict[str, Any]:
    """The plan a capable manager returns, made by rule from the manager's own message."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    request = user.split("Request: ", 1)[1].split("\nTables: <data>", 1)[0]
    block = user.split("Tables: <data>\n", 1)[1].split("\n</data>", 1)[0]
    tables = [json.loads(line) for line in block.splitlines() if line.strip()]
    tools_part = user.rsplit("\nTools: ", 1)[1]
    granted = re.findall(r"^- (\w+):", tools_part, re.M)
    named = [t for t in granted if t in request]
    table = next((t for t in tables if "{" + t["name"] + "}" in request), tables[0])
    columns = {c["name"]: c for c in table["columns"]}
    text_col = "text" if "text" in columns else next(iter(columns))
    avg = columns[text_col].get("avg_chars") or 0
    lowered = request.lower()
    if "redact" in lowered:
        outputs = [_out("redacted_text", "string", "the text with every PII value redacted")]
    elif "summar" in lowered:
        outputs = [_out("summary", "string", "what happens, in 2-3 sentences")]
    else:
        wanted = [
            ("vendor", "string", "the company that issued the invoice"),
            ("date", "string", "invoice date, YYYY-MM-DD"),
            ("total", "number", "total amount due"),
            ("currency", "string", "three-letter currency code"),
        ]
        outputs = [_out(*w) for w in wanted if w[0] in lowered] or [
            _out("answer", "string", "the answer")
        ]
    first = {
        "id": "passage_summary" if "summar" in lowered else "extract",
        "kind": "map",
        "source": table["name"],
        "batch_size": 20 if avg < 2000 else 1,
        "instruction": request[:900],
        "tools": named,
        "depends_on": [],
        "outputs": outputs,
    }
    stages = [first]
    if "summar" in lowered:
        # The levels the request names ("each chapter", "each book"), finest first; each reduce
        # keeps the coarser keys too, so the next level can group by them.
        groups = [g for g in dict.fromkeys(re.findall(r"each (\w+)", lowered)) if g in columns]
        for i, group in enumerate(groups):
            stages.append(_reduce(f"{group}_summary", stages[-1]["id"], groups[i:][::-1]))
        if re.search(r"whole (novel|book|corpus)|the novel|one summary of", lowered):
            stages.append(_reduce("novel_summary", stages[-1]["id"], []))
    stages = stages[:4]
    return {"summary": request[:280], "stages": stages, "output": stages[-1]["id"]}


def _out(name: str, kind: str, description: str) -> dict[str, Any]:
    return {"name": name, "type": kind, "description": description, "choices": []}


def _reduce(stage_id: str, source: str, group: list[str]) -> dict[str, Any]:
    where = " of " + ", ".join(f"{{{g}}}" for g in group) if group else ""
    return {
        "id": stage_id,
        "kind": "reduce",
        "source": source,
        "group_by": group,
        "fan_in": 10,
        "instruction": f"Combine these summaries{where} into one summary.",
        "tools": [],
        "depends_on": [],
        "outputs": [_out("summary", "string", "what happens, in 2-3 sentences")],
    }


# -- running the notebooks ---------------------------------------------------------------------
class Watch:
    """Samples RSS of the kernel (the bench's child process) and of all its descendants."""

    def __init__(self) -> None:
        self.kernel_peak = 0
        self.tree_peak = 0
        self.loads: list[float] = []  # the machine's 1-minute load average (other users too)
        self.ray_seen = False  # a Ray worker ran under the kernel: the workers ran on Ray
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.5):
            tree = 0
            for child in me.children():
                try:
                    rss = child.memory_info().rss
                    self.kernel_peak = max(self.kernel_peak, rss)
                    descendants = child.children(recursive=True)
                    tree += rss + sum(p.memory_info().rss for p in descendants)
                    self.ray_seen = self.ray_seen or any(
                        p.name().startswith(("ray::", "raylet")) for p in descendants
                    )
                except psutil.Error:
                    continue
            self.tree_peak = max(self.tree_peak, tree)
            self.loads.append(os.getloadavg()[0])


class Stats:
    """First chat request times (wall clock) seen by the server: manager and worker."""

    def __init__(self) -> None:
        self.first_manager: float | None = None
        self.first_worker: float | None = None
        self.requests = 0

    def wrap(self, responder: Any) -> Any:
        def counted(body: dict[str, Any]) -> Any:
            now = time.time()
            self.requests += 1
            if is_manager_request(body):
                self.first_manager = self.first_manager or now
            else:
                self.first_worker = self.first_worker or now
            try:
                return responder(body)
            except Exception as exc:  # a bug in the stand-in: fail fast and visibly, not retried
                return Reply.error(400, message=f"stand-in responder failed: {exc!r}")

        return counted


def report_of(texts: list[str]) -> dict[str, Any]:
    """The notebook's own figures: the last output holding a dict with "tokens"."""
    for text in reversed(texts):
        for line in [text, *reversed(text.splitlines())]:
            start = line.find("{")
            if start < 0 or "tokens" not in line:
                continue
            candidate = line[start:]
            for parse in (json.loads, ast.literal_eval):
                try:
                    value = parse(candidate)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, dict) and "tokens" in value:
                    return value
        start = text.rfind("\n{")
        if "tokens" in text and start >= 0:
            try:
                value = ast.literal_eval(text[start + 1 :])
                if isinstance(value, dict):
                    return value
            except (ValueError, SyntaxError):
                pass
    raise RuntimeError("the notebook printed no report with tokens")


def cell_seconds(notebook: Any, marker: str) -> float | None:
    """How long the first code cell containing `marker` ran (nbclient's timing metadata)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and marker in cell.source:
            timing = cell.get("metadata", {}).get("execution", {})
            began, ended = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
            if began and ended:
                parse = datetime.fromisoformat
                seconds = parse(ended.replace("Z", "+00:00")) - parse(began.replace("Z", "+00:00"))
                return round(seconds.total_seconds(), 1)
    return None


def cell_start(notebook: Any, marker: str) -> float | None:
    """Wall-clock start (epoch s) of the first code cell containing `marker` (nbclient timing)."""
    for cell in notebook.cells:
        if cell.cell_type == "code" and marker in cell.source:
            stamp = cell.get("metadata", {}).get("execution", {}).get("iopub.execute_input")
            if stamp:
                return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return None


def run_notebook(name: str, env: dict[str, str], server: FakeOpenAIServer, out: Path) -> dict:
    """Execute one notebook against `server`; its report plus memory and start-up figures."""
    from apwa_jupyter.demo import execute, text_outputs

    stats = Stats()
    server.responder = stats.wrap(respond)
    server.max_in_flight = 0
    saved = dict(os.environ)
    os.environ.update(env)
    cwd = os.getcwd()
    os.chdir(NOTEBOOKS)  # the kernel starts where the notebook is, as Jupyter starts it
    began = time.time()
    try:
        with Watch() as watch:
            notebook = execute(name, str(out / name), timeout=3600)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    total = time.time() - began
    figures = report_of(text_outputs(notebook))
    run_cell = cell_start(notebook, "%%apwa") or cell_start(notebook, ".plan(")
    first = stats.first_manager
    return {
        "report": figures,
        "notebook_s": round(total, 1),
        "requests": stats.requests,
        "most_requests_in_flight": server.max_in_flight,
        "first_request_after_cell_start_s": round(first - run_cell, 2)
        if first and run_cell
        else None,
        "first_worker_request_after_cell_start_s": round(stats.first_worker - run_cell, 2)
        if stats.first_worker and run_cell
        else None,
        "files_cell_s (extraction, incl. Ray start)": cell_seconds(notebook, "apwa.files("),
        "load_average_mean": round(sum(watch.loads) / len(watch.loads), 1) if watch.loads else None,
        "executor": "ray (local cluster)" if watch.ray_seen else "local (asyncio in the kernel)",
        "kernel_rss_peak_mib": round(watch.kernel_peak / 2**20),
        "kernel_and_ray_rss_peak_mib": round(watch.tree_peak / 2**20),
    }


def markdown(results: dict[str, Any]) -> str:
    """The README table, with the line saying what the quality figures measure."""
    files = {"pii": "pii_redaction", "schema": "schema_extraction", "book": "book_summary"}
    lines = [
        "| notebook | size | run wall time | subtasks | tokens | failures | quality* | workers | "
        "whole notebook |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in results["notebooks"].items():
        lines.append(
            f"| {files.get(key, key)} | {entry['size']} | {_num(entry['wall_s'])} s | "
            f"{_num(entry['subtasks'])} | {_num(entry['tokens'])} | {entry['failures']} | "
            f"{entry['quality']} | {entry.get('executor', '')} | {_num(entry.get('notebook_s'))} s |"
        )
    lines.append(
        f"\n*Test server on 127.0.0.1 answering after {results['latency_s']:g} s; `%%apwa` cells "
        f"at concurrency {results['concurrency']}; {results['machine']}. Its answers come from a "
        "rule-based stand-in model that never reads the ground truth (`bench/workloads.py`), so "
        "the quality column measures the pipeline end to end (plan, batching, tool calls, row "
        "keys, assembly), not a model."
    )
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def summarise_entry(key: str, size: str, measured: dict[str, Any]) -> dict[str, Any]:
    figures = measured["report"]
    if key == "pii":
        p = figures["pipeline"]
        r = figures["regexes_alone"]
        quality = (
            f"precision {p['precision']}, recall {p['recall']} (regexes alone: precision "
            f"{r['precision']}, recall {r['recall']})"
        )
    elif key == "schema":
        quality = "field accuracy " + ", ".join(f"{k} {v}" for k, v in figures["accuracy"].items())
    else:  # no ground truth for a summary: every level complete is what can be checked
        levels = figures.get("levels", {})
        quality = "rows per level " + ", ".join(f"{k} {v}" for k, v in levels.items())
    return (
        {
            "size": size,
            "wall_s": figures.get("wall_s"),
            "subtasks": figures.get("subtasks"),
            "tokens": figures.get("tokens"),
            "failures": figures.get("failures"),
            "quality": quality,
            "state": figures.get("state"),
            "stand_in_rule": RULES[key],
        }
        | {k: v for k, v in measured.items() if k != "report"}
        | {"notebook_report": figures}
    )


def write_invoice_folder(folder: Path, n: int) -> None:
    """`n` small invoices, a quarter each PDF, HTML, JSON and text (like the schema notebook)."""
    from fpdf import FPDF

    for i in range(n):
        kind = ["pdf", "html", "json", "txt"][i % 4]
        line = f"INVOICE INV-{10000 + i} From: Vendor {i % 8} Total due: {i}.50 EUR"
        path = folder / f"invoice_{i:05d}.{kind}"
        if kind == "pdf":
            pdf = FPDF()
            pdf.add_page()
            pdf.set_font("Helvetica", size=12)
            pdf.cell(0, 9, line)
            pdf.output(str(path))
        elif kind == "html":
            path.write_text(f"<html><body><p>{line}</p></body></html>")
        elif kind == "json":
            path.write_text(json.dumps({"invoice": line}))
        else:
            path.write_text(line + "\n")


def extraction_section(n: int) -> dict[str, Any]:
    """Seconds to read `n` files into a table: in this process, a pool of 2, and Ray tasks.

    Ray is started first and timed apart (in a kernel the first run would start it anyway).
    """
    import asyncio

    import pandas as pd

    from apwa_jupyter.documents import files
    from apwa_jupyter.executors.ray import RayExecutor

    folder = Path(tempfile.mkdtemp(prefix="apwa-extract-"))
    write_invoice_folder(folder, n)
    out: dict[str, Any] = {"files": n, "load_average_before": round(os.getloadavg()[0], 1)}
    began = time.perf_counter()
    here = files(folder, workers=1)
    out["in_process_s"] = round(time.perf_counter() - began, 1)
    began = time.perf_counter()
    files(folder, workers=2)
    out["process_pool_2_s"] = round(time.perf_counter() - began, 1)
    executor = RayExecutor(concurrency=8, num_actors=1)
    began = time.perf_counter()
    asyncio.run(executor.start())
    out["ray_start_s"] = round(time.perf_counter() - began, 1)
    try:
        for label in ("ray_tasks_cold_s", "ray_tasks_warm_s"):
            began = time.perf_counter()
            on_ray = files(folder, executor=executor)
            out[label] = round(time.perf_counter() - began, 1)
        out["ray"] = on_ray.attrs["apwa_extraction"] | {
            "processes": len(on_ray.attrs["apwa_extraction"]["processes"])
        }
        pd.testing.assert_frame_equal(here, on_ray)  # the same table, wherever it was read
    finally:
        executor.shutdown()
    return out


def main() -> None:
    """Run the selected notebooks at the given sizes and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="pii,schema,book")
    parser.add_argument("--pii-tickets", type=int, default=300_000)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=LATENCY_S)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--extraction", type=int, default=0, help="also time files() on N files (here/pool/Ray)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="apwa-workloads-"))
    ipython_dir = work / "ipython"
    (ipython_dir / "profile_default").mkdir(parents=True)
    # The kernel's magics read their settings from the profile: concurrency for %%apwa cells.
    (ipython_dir / "profile_default" / "ipython_kernel_config.py").write_text(
        f"c.ApwaMagics.concurrency = {args.concurrency}\n"
    )
    server = FakeOpenAIServer(respond, latency=args.latency, record=False).start()
    env = {
        "OPENAI_BASE_URL": server.base_url,
        "APWA_MODEL": MODEL,
        "APWA_CACHE_DIR": str(work / "store"),  # fresh: every answer computed, none replayed
        "IPYTHONDIR": str(ipython_dir),
        "APWA_PII_TICKETS": str(args.pii_tickets),
        "APWA_DOCS": str(args.docs),
        "APWA_FULL": "1",
        "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/apwa-bench-ray"),
    }
    env.pop("OPENAI_API_KEY", None)
    os.environ.pop("OPENAI_API_KEY", None)
    plan = {
        "pii": ("pii_redaction.ipynb", f"{args.pii_tickets:,} tickets"),
        "schema": ("schema_extraction.ipynb", f"{args.docs:,} documents"),
        "book": ("book_summary.ipynb", "War and Peace, 3.2 MB"),
    }
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results: dict[str, Any] = {
        "latency_s": args.latency,
        "concurrency": args.concurrency,
        "executor": "the notebook's: %%apwa cells use the default (a local Ray cluster)",
        "model": "rule-based stand-in on FakeOpenAIServer (127.0.0.1); never reads ground truth",
        "stand_in_rules": RULES,
        "machine": f"{os.cpu_count()} cores, shared with other jobs",
        "notebooks": dict(previous.get("notebooks", {})),
    }
    results["markdown"] = markdown(results)
    if "extraction" in previous:
        results["extraction"] = previous["extraction"]
    if args.extraction:
        results["extraction"] = extraction_section(args.extraction)
        print(json.dumps(results["extraction"]), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        for key in [k.strip() for k in args.only.split(",") if k.strip()]:
            name, size = plan[key]
            print(f"running {name} ({size}) ...", flush=True)
            measured = run_notebook(name, env, server, work)
            results["notebooks"][key] = summarise_entry(key, size, measured)
            print(json.dumps(results["notebooks"][key], indent=1, default=str)[:3000], flush=True)
            results["markdown"] = markdown(results)
            Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
    finally:
        server.stop()
    print(results.get("markdown", ""))
    print(f"executed notebooks in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
