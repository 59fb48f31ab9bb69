"""Documents as data tables: every format, unreadable files as error rows, chunking, token counts."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from apwa_jupyter import documents
from apwa_jupyter.documents import chunks, count_tokens, files, split_text, token_counter
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.namespace import is_table_like
from apwa_jupyter.tables import FREE_TEXT_SAMPLE_CHARS, DataTable

BOOK = Path("/work/shared/data/moby_dick.txt")
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


def write_pdf(path: Path, lines: list[str]) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    for line in lines:
        pdf.cell(0, 10, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))


def write_docx(path: Path, paragraphs: list[str], table: list[list[str]]) -> None:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    grid = document.add_table(rows=len(table), cols=len(table[0]))
    for r, row in enumerate(table):
        for c, value in enumerate(row):
            grid.cell(r, c).text = value
    document.save(str(path))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """One file of every supported format, each with a marker word that must come out."""
    write_pdf(tmp_path / "a.pdf", ["Invoice from ACME-PDF", "Total 12.50 EUR"])
    write_docx(tmp_path / "b.docx", ["Letter from ACME-DOCX."], [["item", "price"], ["bolt", "3"]])
    (tmp_path / "c.html").write_text(
        "<html><head><title>t</title><style>.x{color:red}</style></head><body>"
        "<script>var hidden = 'SCRIPT-TEXT';</script><h1>ACME-HTML</h1><p>Paid &amp; done.</p>"
        "</body></html>"
    )
    (tmp_path / "d.json").write_text(json.dumps({"vendor": "ACME-JSON", "total": 3}))
    (tmp_path / "e.csv").write_text("vendor,total\nACME-CSV,4\n")
    (tmp_path / "f.md").write_text("# ACME-MD\n\nSome *markdown*.\n")
    (tmp_path / "g.txt").write_text("ACME-TXT plain text, café.\n")
    (tmp_path / "h.txt").write_bytes("ACME-CP1252 caf\xe9".encode("cp1252"))
    (tmp_path / "README").write_text("ACME-NOSUFFIX\n")
    return tmp_path


def test_every_format_becomes_one_row_with_its_text(folder: Path):
    docs = files(folder)
    assert list(docs.columns) == ["path", "name", "type", "size", "text", "error"]
    assert docs.attrs["apwa_kind"] == "documents"
    by_name = docs.set_index("name")
    expected = {
        "a.pdf": ("pdf", "ACME-PDF"),
        "b.docx": ("docx", "ACME-DOCX"),
        "c.html": ("html", "ACME-HTML"),
        "d.json": ("json", '"vendor": "ACME-JSON"'),
        "e.csv": ("csv", "vendor,total\nACME-CSV,4"),
        "f.md": ("markdown", "# ACME-MD"),
        "g.txt": ("text", "café"),
        "h.txt": ("text", "ACME-CP1252 café"),
        "README": ("text", "ACME-NOSUFFIX"),
    }
    assert set(by_name.index) == set(expected)
    for name, (kind, marker) in expected.items():
        row = by_name.loc[name]
        assert row["type"] == kind, name
        assert pd.isna(row["error"]), (name, row["error"])
        assert marker in row["text"], (name, row["text"])
        assert row["size"] == (folder / name).stat().st_size
        assert Path(row["path"]).is_absolute()
    assert "Total 12.50 EUR" in by_name.loc["a.pdf", "text"]
    assert "bolt | 3" in by_name.loc["b.docx", "text"]  # DOCX tables are read too
    html = by_name.loc["c.html", "text"]
    assert "Paid & done." in html and "SCRIPT-TEXT" not in html and "color:red" not in html


def test_an_unreadable_file_is_a_row_with_an_error_and_the_others_are_read(tmp_path: Path):
    from pypdf import PdfWriter

    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "broken.pdf").write_bytes(b"this is not a pdf at all")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "photo.xyz").write_bytes(b"\x89PNG....")
    (tmp_path / "broken.docx").write_bytes(b"PK\x03\x04 not really a zip")
    writer = PdfWriter()
    writer.add_blank_page(72, 72)
    writer.encrypt("secret")
    writer.write(str(tmp_path / "locked.pdf"))
    writer = PdfWriter()
    writer.add_blank_page(72, 72)
    writer.write(str(tmp_path / "scan.pdf"))
    paths = [*sorted(tmp_path.iterdir()), tmp_path / "missing.txt"]
    docs = files(paths).set_index("name")
    assert len(docs) == 8
    assert docs.loc["good.txt", "text"] == "fine" and pd.isna(docs.loc["good.txt", "error"])
    reasons = {
        "broken.pdf": "Pdf",
        "blob.txt": "binary content",
        "photo.xyz": "unsupported file type .xyz",
        "broken.docx": "",
        "locked.pdf": "encrypted",
        "scan.pdf": "no text layer",
        "missing.txt": "FileNotFoundError",
    }
    for name, reason in reasons.items():
        error = docs.loc[name, "error"]
        assert isinstance(error, str) and reason in error, (name, error)
        assert "\n" not in error and len(error) < 400  # one line
        assert pd.isna(docs.loc[name, "text"])


def test_globs_folders_lists_and_pathlib_globs_name_the_same_files(folder: Path, monkeypatch):
    monkeypatch.chdir(folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.txt").write_text("deep")
    assert list(files("*.txt")["name"]) == ["g.txt", "h.txt"]
    assert list(files(folder.glob("*.txt"))["name"]) == ["g.txt", "h.txt"]
    assert list(files([folder / "h.txt", "g.txt"])["name"]) == ["h.txt", "g.txt"]  # order kept
    assert list(files("**/*.txt")["name"]) == ["g.txt", "h.txt", "deep.txt"]
    assert len(files(folder)) == 9  # a folder: the files directly in it
    assert list(files(folder / "g.txt")["name"]) == ["g.txt"]
    with pytest.raises(UserInputError, match=r"'\*\.pdfx' matches no file"):
        files("*.pdfx")
    with pytest.raises(UserInputError, match="does not exist"):
        files("nope.txt")
    with pytest.raises(UserInputError, match="empty list"):
        files([])
    with pytest.raises(UserInputError, match="not a path"):
        files([1, 2])


def test_a_process_pool_reads_the_same_rows_as_one_process(folder: Path):
    in_process = files(folder, workers=1)
    pooled = files(folder, workers=2)
    pd.testing.assert_frame_equal(in_process, pooled)


def test_a_documents_table_is_a_data_table_whose_metadata_cuts_the_text(folder: Path):
    docs = files(folder)
    docs.loc[0, "text"] = "Secret instructions " * 50
    assert is_table_like(docs)
    meta = DataTable.from_value("docs", docs).metadata()
    assert meta.rows == 9
    text_info = next(c for c in meta.columns if c.name == "text")
    assert text_info.avg_chars is not None and text_info.avg_chars > 0
    for row in meta.sample:
        value = row["text"]
        assert pd.isna(value) or len(value) <= FREE_TEXT_SAMPLE_CHARS + 1


def paragraphs_text() -> str:
    sentences = [f"Sentence number {i} says something about whales and ships." for i in range(60)]
    paras = [" ".join(sentences[i : i + 6]) for i in range(0, 60, 6)]
    return "\n\n".join(paras)


@pytest.mark.parametrize("encoding", [None, "estimate"])
def test_chunks_stay_under_the_budget_end_on_sentences_and_overlap(encoding):
    text = paragraphs_text()
    counter = token_counter(encoding)
    spans = split_text(text, tokens=120, overlap=30, counter=counter)
    assert len(spans) > 3
    for start, end in spans:
        piece = text[start:end]
        assert counter(piece) <= 120
        assert SENTENCE_END.search(piece), piece[-40:]
        assert piece == piece.strip()
    for (s1, e1), (s2, e2) in itertools.pairwise(spans):
        assert s1 < s2 < e1 < e2  # progress, with overlap
        assert 0 < counter(text[s2:e1]) <= 30 + 2  # the shared sentences, about `overlap`
    covered = set()
    for start, end in spans:
        covered.update(range(start, end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing dropped


def test_chunks_prefer_paragraph_ends_and_tile_exactly_without_overlap():
    text = paragraphs_text()
    counter = token_counter()
    spans = split_text(text, tokens=200, overlap=0, counter=counter)
    paragraph_ends = {m.start() for m in re.finditer(r"\n\n", text)} | {len(text)}
    assert all(end in paragraph_ends for _, end in spans)
    rebuilt = "\n\n".join(text[s:e] for s, e in spans)
    assert rebuilt == text  # paragraphs of ~6 sentences fit whole: chunks are whole paragraphs
    for (_, e1), (s2, _) in itertools.pairwise(spans):
        assert e1 < s2


def test_a_sentence_longer_than_the_budget_is_cut_at_spaces_then_anywhere():
    words = " ".join(f"word{i}" for i in range(400))  # no sentence end at all
    spans = split_text(words, tokens=50, overlap=0)
    counter = token_counter()
    assert len(spans) > 5
    assert all(counter(words[s:e]) <= 50 for s, e in spans)
    assert all(words[s - 1] == " " for s, _ in spans[1:])  # cut between words
    assert " ".join(words[s:e] for s, e in spans) == words
    blob = "x" * 5_000  # one "word": cut anywhere, still within budget and complete
    spans = split_text(blob, tokens=100, overlap=0)
    assert "".join(blob[s:e] for s, e in spans) == blob
    assert all(counter(blob[s:e]) <= 100 for s, e in spans)


def test_chunk_table_keeps_where_each_chunk_came_from():
    book = pd.DataFrame(
        {
            "book": ["One", "One", "Two"],
            "chapter": ["I", "II", "I"],
            "text": [paragraphs_text(), "Short chapter. Two sentences.", None],
        },
        index=pd.Index(["c1", "c2", "c3"], name="id"),
    )
    table = chunks(book, tokens=150, overlap=20)
    assert list(table.columns) == ["book", "chapter", *documents.CHUNK_COLUMNS]
    assert set(table["doc"]) == {"c1", "c2"}  # the row without text gives no chunk
    for _, row in table.iterrows():
        assert book.loc[row["doc"], "text"][row["start"] : row["end"]] == row["text"]
        assert row["tokens"] == count_tokens(row["text"]) <= 150
        assert row["chapter"] == book.loc[row["doc"], "chapter"]
    assert list(table[table["doc"] == "c1"]["chunk"]) == list(range((table["doc"] == "c1").sum()))
    assert table.attrs["apwa_tokenizer"] == "tiktoken cl100k_base"
    assert table.attrs["apwa_kind"] == "chunks"
    assert is_table_like(table)
    assert list(chunks(["a. b.", "c."], tokens=50)["doc"]) == [0, 1]
    with pytest.raises(UserInputError, match="no column 'body'"):
        chunks(book, text_column="body")


def test_a_real_book_chunks_within_budget_on_sentence_ends():
    text = BOOK.read_text()[:200_000]
    table = chunks(text, tokens=800, overlap=100)
    assert table["tokens"].max() <= 800
    assert table["tokens"].median() > 600  # chunks are filled, not fragments
    ends = table["text"].str.contains(r"[.!?][\"'\u201d\u2019)\]]*$", regex=True)
    assert ends.mean() > 0.95


def test_tokens_are_counted_with_tiktoken_offline():
    counter = token_counter()
    assert counter.name == "tiktoken cl100k_base" and counter.exact
    assert count_tokens("hello world") == 2  # cl100k_base: "hello", " world"
    assert count_tokens("<|endoftext|>") > 1  # special tokens in data are plain text
    estimate = token_counter("estimate")
    assert not estimate.exact and estimate("x" * 40) == 10
    with pytest.raises(UserInputError, match="no encoding 'nope'"):
        token_counter("nope")


def test_without_tiktoken_the_estimate_is_used_and_named(monkeypatch):
    token_counter.cache_clear()
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    try:
        assert token_counter().name == documents.ESTIMATE
        table = chunks("One sentence. Another one.", tokens=50)
        assert table.attrs["apwa_tokenizer"] == "estimate (characters / 4)"
    finally:
        token_counter.cache_clear()


# -- extraction on the workers (issue #11: "in parallel on the workers, not in the kernel") ------
def test_on_ray_each_file_is_extracted_in_a_ray_worker_in_order_with_error_rows(
    folder: Path, ray_executor
):
    (folder / "broken.pdf").write_bytes(b"this is not a pdf at all")
    paths = [*sorted(folder.iterdir(), reverse=True), folder / "missing.txt"]  # not sorted order
    docs = files(paths, executor=ray_executor)
    where = docs.attrs["apwa_extraction"]
    assert where["where"] == "ray" and where["tasks"] >= 2
    assert where["processes"] and os.getpid() not in where["processes"]
    assert list(docs["name"]) == [p.name for p in paths]  # the given order, across tasks
    by_name = docs.set_index("name")
    assert "Pdf" in by_name.loc["broken.pdf", "error"]
    assert "FileNotFoundError" in by_name.loc["missing.txt", "error"]
    assert by_name.loc["missing.txt", "path"] == str(folder / "missing.txt")
    assert "ACME-PDF" in by_name.loc["a.pdf", "text"]
    in_kernel = files(paths, workers=1)
    assert in_kernel.attrs["apwa_extraction"] == {
        "where": "this process",
        "processes": [os.getpid()],
    }
    pd.testing.assert_frame_equal(docs, in_kernel, check_like=False)


def test_run_on_cluster_streams_results_in_order_and_returns_a_failed_batch_as_its_error(
    ray_executor,
):
    from apwa_jupyter.executors.ray import run_on_cluster

    def square_or_fail(batch):
        if batch == [3]:
            raise ValueError("batch three is bad")
        return [x * x for x in batch], os.getpid()

    out = list(run_on_cluster(square_or_fail, [[1, 2], [3], [4], [5, 6]], window=2))
    assert [o[0] if isinstance(o, tuple) else "error" for o in out] == [
        [1, 4],
        "error",
        [16],
        [25, 36],
    ]
    assert "batch three is bad" in str(out[1])
    assert {o[1] for o in out if isinstance(o, tuple)} - {os.getpid()}  # ran in Ray workers


def test_without_ray_a_big_folder_is_read_by_a_process_pool_and_a_few_files_in_process(
    folder: Path,
):
    assert files(folder).attrs["apwa_extraction"]["where"] == "this process"  # small: no pool
    pooled = files(folder, workers=2).attrs["apwa_extraction"]
    assert pooled["where"] == "process pool" and os.getpid() not in pooled["processes"]
    with pytest.raises(UserInputError, match="executor"):
        files(folder, executor="spark")


def test_files_uses_the_sessions_executor_ray_when_it_is_ray_a_pool_when_local(
    tmp_path: Path, ray_executor, monkeypatch
):
    from apwa_jupyter import session as session_module
    from apwa_jupyter.session import Session

    for i in range(documents.POOL_MIN_PARSED):  # enough PDFs to be worth reading in parallel
        write_pdf(tmp_path / f"invoice_{i:02d}.pdf", [f"Invoice {i}"])
    monkeypatch.setattr(session_module, "_default", Session(executor=ray_executor, store=False))
    on_ray = files(tmp_path)
    assert on_ray.attrs["apwa_extraction"]["where"] == "ray"
    assert list(on_ray["text"].str.strip()) == [
        f"Invoice {i}" for i in range(documents.POOL_MIN_PARSED)
    ]
    assert files(tmp_path / "invoice_00.pdf", executor="ray").attrs["apwa_extraction"]["tasks"] == 1
    monkeypatch.setattr(session_module, "_default", Session(executor="local", store=False))
    assert files(tmp_path).attrs["apwa_extraction"]["where"] == "process pool"
    with pytest.raises(UserInputError, match="executor=local"):
        files(tmp_path, executor="ray")
    monkeypatch.setattr(session_module, "_default", None)  # no session: no Ray started for this
    assert files(tmp_path).attrs["apwa_extraction"]["where"] == "process pool"
