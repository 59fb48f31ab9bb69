"""Context compactness: how big the manager's request is, against pasting the table as text.

For each table shape the manager request is built exactly as the manager sends it
(`build_manager_request`: system prompt, prompt, table metadata, tool list, plus the plan JSON
schema as `response_format`). The alternative is pasting the frame into the prompt:
`df.to_csv()` (every row; what "give the model the data" costs) and `str(df)` (pandas' display
form, which silently truncates to 10 rows and 20 columns, so the model never sees the rest).
Tokens are estimated as chars / 4 (no tokenizer is installed here).

Frames are built with vectorised numpy/pyarrow, so 10,000,000 x 50 costs a few GiB and seconds.
CSV sizes above `CSV_EXACT_UP_TO` rows are measured on that many rows and scaled linearly (the
values are uniform, so chars per row are stable).
"""

from __future__ import annotations

import gc
import json
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
from common import log, timed

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.manager import build_manager_request
from apwa_jupyter.tables import DataTable

PROMPT = "For every order in {t}, classify the customer's complaint and estimate the refund."
CSV_EXACT_UP_TO = 100_000
CHARS_PER_TOKEN = 4
WORDS = np.array(["late", "broken", "refund", "great", "missing", "wrong", "size", "colour"])


def column(kind: int, rows: int, rng: np.random.Generator) -> Any:
    """One column of a kind chosen by position: text, id, price, category, flag, quantity."""
    if kind == 0:  # free text, unique per row
        ids = pa.array(np.arange(rows)).cast(pa.string())
        words = pc.take(pa.array(WORDS), pa.array(rng.integers(0, len(WORDS), rows)))
        text = pc.binary_join_element_wise("order", ids, "arrived", words, " ")
        return pd.Series(text, dtype=pd.ArrowDtype(pa.string()))
    if kind == 1:
        return np.arange(rows, dtype=np.int64)
    if kind == 2:
        return rng.random(rows) * 500
    if kind == 3:  # low-cardinality string
        values = pc.take(pa.array(WORDS), pa.array(rng.integers(0, len(WORDS), rows)))
        return pd.Series(values, dtype=pd.ArrowDtype(pa.string()))
    if kind == 4:
        return rng.random(rows) < 0.3
    return rng.integers(1, 20, rows, dtype=np.int32)


def make_frame(rows: int, columns: int) -> pd.DataFrame:
    """A synthetic orders table of the given shape."""
    rng = np.random.default_rng(0)
    names = ["text", "order_id", "price", "category", "returned", "quantity"]
    data = {
        f"{names[i % 6]}_{i // 6}" if i >= 6 else names[i]: column(i % 6, rows, rng)
        for i in range(columns)
    }
    return pd.DataFrame(data)


def request_chars(table: DataTable) -> dict[str, Any]:
    """Sizes of the manager request: messages alone and the full JSON body with the schema."""
    began = timed()
    request = build_manager_request(PROMPT, {"t": table}, CapabilityRegistry())
    seconds = timed() - began
    messages = sum(len(m["content"]) for m in request.messages)
    body = json.dumps(
        {
            "model": "m",
            "messages": request.messages,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "plan", "schema": request.response_schema, "strict": True},
            },
        }
    )
    return {
        "messages_chars": messages,
        "messages_tokens": messages // CHARS_PER_TOKEN,
        "body_chars": len(body),
        "body_tokens": len(body) // CHARS_PER_TOKEN,
        "metadata_chars": len(table.metadata().to_prompt()),
        "build_s": seconds,
    }


def pasted_chars(df: pd.DataFrame) -> dict[str, Any]:
    """Sizes of the frame's text forms; CSV beyond CSV_EXACT_UP_TO rows is scaled from a head."""
    rows = len(df)
    head = df if rows <= CSV_EXACT_UP_TO else df.iloc[:CSV_EXACT_UP_TO]
    csv = len(head.to_csv(index=False)) * rows / len(head)
    shown = str(df)
    return {
        "csv_chars": int(csv),
        "csv_tokens": int(csv) // CHARS_PER_TOKEN,
        "csv_exact": rows <= CSV_EXACT_UP_TO,
        "str_chars": len(shown),
        "str_tokens": len(shown) // CHARS_PER_TOKEN,
    }


def measure(rows: int, columns: int) -> dict[str, Any]:
    """Build one frame and measure both ways of giving it to a model."""
    df = make_frame(rows, columns)
    began = timed()
    table = DataTable.from_value("t", df)
    convert = timed() - began
    out = {"rows": rows, "columns": columns, "to_arrow_s": convert}
    out |= request_chars(table) | pasted_chars(df)
    out["rss_gib"] = psutil.Process().memory_info().rss / 2**30
    del df, table
    gc.collect()
    log(
        f"context {rows:>10,} x {columns:<2}: request {out['body_tokens']:>5} tokens "
        f"(messages {out['messages_tokens']}), csv {out['csv_tokens']:,} tokens"
    )
    return out


def run_section(quick: bool) -> dict[str, Any]:
    """Every shape: rows 100 .. 10M (1M in quick mode) x columns 3, 10, 50."""
    row_counts = [100, 1_000, 10_000, 100_000, 1_000_000]
    if not quick:
        row_counts.append(10_000_000)
    shapes = [(r, c) for c in (3, 10, 50) for r in row_counts]
    return {"chars_per_token": CHARS_PER_TOKEN, "shapes": [measure(r, c) for r, c in shapes]}
