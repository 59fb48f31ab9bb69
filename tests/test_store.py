"""The result store: stable keys, batched writes, runs and plans, eviction, concurrent kernels."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sqlite3
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.execution.keys import (
    endpoint_identity,
    input_fingerprint,
    plan_key,
    subtask_key,
    template_fingerprint,
)
from apwa_jupyter.store import ResultStore, StoredAnswer


@pytest.fixture
def store(tmp_path: Path):
    s = ResultStore(tmp_path)
    yield s
    s.close()


def _key(i: int, endpoint: str = "e") -> str:
    return subtask_key(endpoint, "t", input_fingerprint({"i": i}))


# -- keys -----------------------------------------------------------------------------------------
def test_input_fingerprint_is_stable_across_types_and_dict_order():
    row = {
        "s": "héllo",
        "i": 3,
        "f": 0.1,
        "b": True,
        "n": None,
        "l": [1, "a", [2.5]],
        "d": {"z": 1, "a": 2},
        "when": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
        "day": dt.date(2025, 1, 2),
        "money": Decimal("1.10"),
        "raw": b"\x00\xff",
        "nan": float("nan"),
        "ts": pd.Timestamp("2025-01-02 03:04:05"),
        "na": pd.NA,
    }
    reordered = dict(reversed(list(row.items())))
    assert input_fingerprint(row) == input_fingerprint(reordered)
    # a value that differs only in type or precision is a different input
    assert input_fingerprint({"x": 1}) != input_fingerprint({"x": 1.0})
    assert input_fingerprint({"x": True}) != input_fingerprint({"x": 1})
    assert input_fingerprint({"x": "1"}) != input_fingerprint({"x": 1})
    assert input_fingerprint({"x": b"a"}) != input_fingerprint({"x": "a"})
    assert input_fingerprint({"x": Decimal("1.1")}) != input_fingerprint({"x": Decimal("1.10")})
    assert input_fingerprint([{"a": 1}, {"a": 2}]) != input_fingerprint([{"a": 2}, {"a": 1}])
    # a known value, so a change in the encoding is a visible decision (it empties every store)
    assert input_fingerprint({"a": 1, "b": ["x", None]}) == input_fingerprint(
        {"b": ["x", None], "a": 1}
    )
    assert len(input_fingerprint(row)) == 64


def test_key_parts_change_the_key():
    tpl = template_fingerprint("Label {text}", {"label": "string"}, [], 1, "map")
    base = subtask_key(endpoint_identity("http://h/v1", "m"), tpl, input_fingerprint({"t": 1}))
    assert base == subtask_key(
        endpoint_identity("http://h/v1/", "m"), tpl, input_fingerprint({"t": 1})
    )
    assert base != subtask_key(
        endpoint_identity("http://h/v1", "m2"), tpl, input_fingerprint({"t": 1})
    )
    assert base != subtask_key(
        endpoint_identity("http://h/v1", "m"), tpl, input_fingerprint({"t": 2})
    )
    for other in [
        template_fingerprint("Label {text}!", {"label": "string"}, [], 1, "map"),
        template_fingerprint("Label {text}", {"label": "integer"}, [], 1, "map"),
        template_fingerprint("Label {text}", {"label": "string"}, ["search"], 1, "map"),
        template_fingerprint("Label {text}", {"label": "string"}, [], 5, "map"),
        template_fingerprint("Label {text}", {"label": "string"}, [], 1, "replicate"),
    ]:
        assert (
            subtask_key(endpoint_identity("http://h/v1", "m"), other, input_fingerprint({"t": 1}))
            != base
        )
    # tool order is not meaningful
    assert template_fingerprint("x", {}, ["a", "b"], 1, "map") == template_fingerprint(
        "x", {}, ["b", "a"], 1, "map"
    )


def test_endpoint_identity_drops_credentials_in_the_url():
    ident = endpoint_identity("https://user:sk-SECRET@host.example/v1?api-key=sk-SECRET2", "m")
    assert "SECRET" not in ident
    assert ident == endpoint_identity("https://host.example/v1", "m")


def test_plan_key_ignores_order_of_tables_and_tools_but_not_content():
    a = plan_key("p", ["{t1}", "{t2}"], "e", ["x", "y"])
    assert a == plan_key("p", ["{t2}", "{t1}"], "e", ["y", "x"])
    assert a != plan_key("p!", ["{t1}", "{t2}"], "e", ["x", "y"])
    assert a != plan_key("p", ["{t1}", "{t2 changed}"], "e", ["x", "y"])
    assert a != plan_key("p", ["{t1}", "{t2}"], "e2", ["x", "y"])
    assert a != plan_key("p", ["{t1}", "{t2}"], "e", ["x"])


# -- answers --------------------------------------------------------------------------------------
def test_put_then_get_many_round_trips_and_misses_are_absent(store):
    keys = [_key(i) for i in range(1500)]  # more than one SQLite variable chunk
    for i, key in enumerate(keys):
        assert store.put(key, StoredAnswer([{"n": i, "tags": ["a"]}], "run1", 10, 2))
    got = store.get_many([*keys, "missing"])  # sees pending writes before any flush
    assert len(got) == 1500 and "missing" not in got
    store.flush()
    reopened = ResultStore(store.path.parent)
    try:
        got = reopened.get_many(keys)
        assert len(got) == 1500
        answer = got[keys[7]]
        assert answer.outputs == [{"n": 7, "tags": ["a"]}]
        assert (answer.run_id, answer.prompt_tokens, answer.completion_tokens) == ("run1", 10, 2)
        assert answer.tokens == 12 and answer.created_at > 0
        assert sorted(reopened.subtask_keys_of("run1")) == sorted(keys)
    finally:
        reopened.close()


def test_failures_are_never_stored(store):
    assert not store.put("k1", StoredAnswer([None], "r"))
    assert not store.put("k2", StoredAnswer([{"a": 1}, None], "r"))
    assert not store.put("k3", StoredAnswer([], "r"))
    store.flush()
    assert store.get_many(["k1", "k2", "k3"]) == {}
    assert store.stats()["answers"] == 0


def test_writes_are_batched_by_a_writer_thread(tmp_path):
    store = ResultStore(tmp_path)
    try:
        for i in range(450):
            store.put(_key(i), StoredAnswer([{"i": i}], "r"))
        store.flush()
        # 450 records -> a few transactions, not 450 (200 per batch, or whatever the timer caught)
        assert store.stats()["answers"] == 450
        assert 1 <= store.write_transactions <= 10
    finally:
        store.close()


def test_close_writes_everything_pending(tmp_path):
    store = ResultStore(tmp_path)
    for i in range(300):
        store.put(_key(i), StoredAnswer([{"i": i}], "r"))
    store.close()
    again = ResultStore(tmp_path)
    try:
        assert len(again.get_many([_key(i) for i in range(300)])) == 300
    finally:
        again.close()


# -- location -------------------------------------------------------------------------------------
def test_location_explicit_then_env_then_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("APWA_CACHE_DIR", str(tmp_path / "env"))
    explicit = ResultStore(tmp_path / "explicit")
    from_env = ResultStore()
    try:
        assert explicit.path == tmp_path / "explicit" / "results.sqlite3"
        assert from_env.path == tmp_path / "env" / "results.sqlite3"
    finally:
        explicit.close()
        from_env.close()
    monkeypatch.delenv("APWA_CACHE_DIR")
    import platformdirs

    assert (
        ResultStore.default_path()
        == Path(platformdirs.user_data_dir("apwa-jupyter")) / "results.sqlite3"
    )
    assert Path.cwd() not in ResultStore.default_path().parents


# -- runs, results, plans -------------------------------------------------------------------------
def test_runs_are_listed_newest_first_and_updated(store):
    store.record_run("old", {"prompt": "a", "created_at": 100.0, "state": "done"})
    store.record_run("new", {"prompt": "b", "created_at": 200.0, "state": "running"})
    store.update_run("new", state="done", counts={"done": 3})
    runs = store.runs()
    assert [r["run_id"] for r in runs] == ["new", "old"]
    assert runs[0]["state"] == "done" and runs[0]["counts"] == {"done": 3}
    assert runs[0]["prompt"] == "b" and runs[0]["has_result"] is False


def test_run_meta_refuses_secret_fields(store):
    with pytest.raises(ValueError, match="api_key"):
        store.record_run("r", {"api_key": "sk-x"})
    store.record_run("r", {"prompt": "p"})
    with pytest.raises(ValueError, match=r"(?i)authorization"):
        store.update_run("r", Authorization="Bearer x")


def test_result_frame_round_trips_with_its_index(store):
    frame = pd.DataFrame(
        {
            "text": pd.array(["a", None, "c"], dtype="string"),
            "n": pd.array([1, None, 3], dtype="Int64"),
            "ok": [True, False, True],
            "tags": [["x"], [], ["y", "z"]],
        },
        index=pd.Index(["r1", "r2", "r3"], name="rid"),
    )
    store.record_run("r", {"prompt": "p"})
    assert store.save_result("r", frame) is True
    back = store.load_result("r")
    pd.testing.assert_frame_equal(back.drop(columns="tags"), frame.drop(columns="tags"))
    assert [list(v) for v in back["tags"]] == [["x"], [], ["y", "z"]]
    assert store.runs()[0]["has_result"] is True
    assert store.load_result("unknown") is None


def test_a_frame_that_cannot_be_stored_returns_false(store):
    class Opaque:
        pass

    frame = pd.DataFrame({"x": [Opaque(), 1]})
    store.record_run("r", {})
    assert store.save_result("r", frame) is False
    assert store.load_result("r") is None


def test_plans_round_trip(store):
    key = plan_key("p", ["m"], "e", [])
    assert store.load_plan(key) is None
    store.save_plan(key, '{"stages": []}')
    assert store.load_plan(key) == '{"stages": []}'
    store.save_plan(key, '{"stages": [1]}')
    assert store.load_plan(key) == '{"stages": [1]}'


# -- size cap, stats, clear -----------------------------------------------------------------------
def test_size_cap_evicts_least_recently_used_answers(tmp_path):
    cap = 400_000  # about 227 answers of 1 KB fit under 90 % of it
    store = ResultStore(tmp_path, max_bytes=cap)
    blob = "x" * 1000

    def put(keys: range) -> None:
        for i in keys:
            store.put(_key(i), StoredAnswer([{"v": blob}], "r"))
        store.flush()

    try:
        put(range(0, 50))  # A: oldest
        put(range(50, 150))  # B
        assert len(store.get_many([_key(i) for i in range(10)])) == 10  # a hit on A[:10]
        store.flush()
        assert store.evicted == 0
        put(range(150, 300))  # C: newest; 300 answers do not fit
        stats = store.stats()
        assert store.evicted > 0 and stats["answers"] == 300 - store.evicted
        assert store.used_bytes() <= cap * 0.9
        assert stats["bytes"] <= cap  # the file shrinks too (incremental vacuum + checkpoint)
        assert len(store.get_many([_key(i) for i in range(10)])) == 10  # used recently: kept
        assert store.get_many([_key(i) for i in range(10, 50)]) == {}  # least recently used: gone
        assert len(store.get_many([_key(i) for i in range(150, 300)])) == 150  # newest: kept
    finally:
        store.close()


def test_stats_and_clear_by_run_or_everything(store):
    for i in range(5):
        store.put(_key(i), StoredAnswer([{"i": i}], "a"))
    for i in range(5, 8):
        store.put(_key(i), StoredAnswer([{"i": i}], "b"))
    store.record_run("a", {"prompt": "pa"})
    store.record_run("b", {"prompt": "pb"})
    store.save_plan("pk", "{}")
    stats = store.stats()
    assert (stats["answers"], stats["runs"], stats["plans"]) == (8, 2, 1)
    assert stats["path"] == str(store.path) and stats["bytes"] > 0
    assert store.clear("a") == 5
    assert store.stats()["answers"] == 3
    assert [r["run_id"] for r in store.runs()] == ["b"]
    assert store.clear() == 3
    stats = store.stats()
    assert (stats["answers"], stats["runs"], stats["plans"]) == (0, 0, 0)


# -- concurrent kernels ---------------------------------------------------------------------------
def _kernel(folder: str, worker: int, count: int, others: list[int]) -> int:
    """One 'kernel': writes its keys while reading the others', returns how many reads hit."""
    store = ResultStore(folder)
    hits = 0
    store.record_run(f"run{worker}", {"prompt": f"p{worker}", "created_at": float(worker)})
    for i in range(count):
        store.put(
            _key(i, f"w{worker}"), StoredAnswer([{"w": worker, "i": i}], f"run{worker}", 5, 1)
        )
        if i % 100 == 99:
            store.flush()
            hits += len(store.get_many([_key(j, f"w{o}") for o in others for j in range(i)]))
            store.update_run(f"run{worker}", state="running", done=i + 1)
    store.save_plan(f"plan{worker}", "{}")
    store.update_run(f"run{worker}", state="done", done=count)
    store.close()
    return hits


def test_concurrent_kernels_do_not_corrupt_the_store(tmp_path):
    workers, count = 3, 1500
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        jobs = [
            pool.apply_async(
                _kernel, (str(tmp_path), w, count, [o for o in range(workers) if o != w])
            )
            for w in range(workers)
        ]
        for job in jobs:
            job.get(timeout=300)
    with sqlite3.connect(tmp_path / "results.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store = ResultStore(tmp_path)
    try:
        keys = [_key(i, f"w{w}") for w in range(workers) for i in range(count)]
        got = store.get_many(keys)
        assert len(got) == workers * count
        assert got[_key(42, "w1")].outputs == [{"w": 1, "i": 42}]
        runs = {r["run_id"]: r for r in store.runs()}
        assert {r: runs[r]["state"] for r in runs} == {f"run{w}": "done" for w in range(workers)}
        assert all(runs[f"run{w}"]["done"] == count for w in range(workers))
        assert store.stats()["plans"] == workers
    finally:
        store.close()


# -- no secrets on disk ---------------------------------------------------------------------------
def test_store_written_during_a_run_does_not_contain_the_api_key(tmp_path, fake_server):
    """A real run with a distinctive key; everything it naturally stores is then grepped for it."""
    from apwa_jupyter.executors.local import LocalExecutor
    from apwa_jupyter.session import Session
    from tests.conftest import FAST_RETRY, map_plan, plan_responder

    secret = "sk-DISTINCTIVE-4f1c9a7e-never-store-me"
    plan = map_plan("t", "Label {text}", [{"name": "label", "type": "string"}])
    server = fake_server(plan_responder(plan, lambda body: {"label": "ok"}))
    endpoint = EndpointConfig(base_url=server.base_url, model="fake-model", api_key=secret)
    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    session = Session(endpoint=endpoint, executor=LocalExecutor(concurrency=4, retry=FAST_RETRY))
    run = session.run("Label {t}", tables={"t": frame})
    assert run.result is not None
    assert all(auth == f"Bearer {secret}" for auth in server.authorizations)  # the key was used

    store = ResultStore(tmp_path)
    ident = endpoint_identity(endpoint.base_url, endpoint.model)
    stage = run.plan.stages[0]
    outputs = {o.name: o.type for o in stage.outputs}
    tpl = template_fingerprint(stage.instruction, outputs, list(stage.tools), 1, stage.kind)
    for position, row in enumerate(frame.to_dict("records")):
        key = subtask_key(ident, tpl, input_fingerprint(row))
        store.put(key, StoredAnswer([run.result.iloc[position].to_dict()], run.id, 3, 1))
    store.record_run(
        run.id,
        {
            "prompt": "Label {t}",
            "endpoint": ident,
            "plan": run.plan.model_dump_json(),
            "config": endpoint.model_dump_json(),
        },
    )
    store.save_plan(plan_key("Label {t}", ["meta"], ident, []), run.plan.model_dump_json())
    assert store.save_result(run.id, run.result)
    store.close()
    blobs = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert len(blobs) > 0 and b"DISTINCTIVE" not in blobs


def test_answers_being_written_are_still_found(tmp_path):
    """The writer takes a batch out of the pending queue before it commits: a lookup in between
    must still find those answers (it missed up to a whole batch, intermittently)."""
    import threading

    store = ResultStore(tmp_path)
    entered, release = threading.Event(), threading.Event()
    original = store._write

    def slow_write(batch, touched):
        entered.set()
        release.wait(10)
        original(batch, touched)

    store._write = slow_write  # type: ignore[method-assign]
    store.put("k", StoredAnswer([{"a": 1}], run_id="r"))
    flushing = threading.Thread(target=store.flush)
    flushing.start()
    assert entered.wait(10)
    try:
        assert store.get_many(["k"])["k"].outputs == [{"a": 1}]
    finally:
        release.set()
        flushing.join(10)
    assert store.get_many(["k"])["k"].run_id == "r"
    store.close()


def test_a_stored_result_comes_back_with_the_users_labels_and_cell_values(store, recwarn):
    """`%apwa load` gives back what `--out` gave: labels, lists, dicts and Decimals as they were."""
    frame = pd.DataFrame(
        {
            0: [1, 2],
            "note": ["a", None],
            "tags": [["x", "y"], []],
            "meta": [{"a": 1}, {"b": "x"}],
            "price": [Decimal("1.5"), Decimal("2.25")],
        },
        index=pd.Index(["r1", "r2"], name="id"),
    )
    assert store.save_result("labels", frame)
    back = store.load_result("labels")
    assert list(back.columns) == [0, "note", "tags", "meta", "price"]
    assert back.index.tolist() == ["r1", "r2"] and back.index.name == "id"
    assert back["tags"].tolist() == [["x", "y"], []]
    assert back["meta"].tolist() == [{"a": 1}, {"b": "x"}]  # no keys a row never had
    assert back["price"].tolist() == [Decimal("1.5"), Decimal("2.25")]
    assert [str(v) for v in back["price"]] == ["1.5", "2.25"]  # not rescaled to 1.50
    pd.testing.assert_series_equal(back["note"], frame["note"])
    tuples = pd.DataFrame([[1, 2]], columns=pd.MultiIndex.from_tuples([("p", "usd"), ("p", "eur")]))
    assert store.save_result("multi", tuples)
    assert store.load_result("multi").columns.tolist() == [("p", "usd"), ("p", "eur")]
    assert not [w for w in recwarn if "not roundtrip" in str(w.message)]
