"""The prompt-and-inspect loop: try on a sample, see answers as they come, look inside one row,
compare two versions, score against labels. Calls are counted at the test server (real HTTP
through the openai client), so "bills only the rest" means what it says.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.errors import UserInputError
from apwa_jupyter.sampling import Sample
from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan
from .test_durable import Counting, session_for
from .test_magics import apwa, ip, shell  # noqa: F401 (fixtures)

PLAN = map_plan(
    "reviews",
    "Is this review positive? {text}",
    [{"name": "mood", "type": "string", "choices": ["good", "bad"]}],
)


def mood(body: dict[str, Any]) -> Reply:
    text = worker_input(body)["text"]
    return Reply.json({"mood": "good" if "great" in text else "bad"})


def reviews(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"review {i} " + ("great" if i % 3 == 0 else "meh") for i in range(n)]},
        index=pd.Index([f"r{i:03d}" for i in range(n)], name="id"),
    )


def test_a_sample_bills_n_rows_and_run_all_bills_only_the_rest(fake_server, registry, tmp_path):
    counting = Counting(mood, PLAN)
    server = fake_server(counting)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    frame = reviews(200)
    sample = session.plan("Label {reviews}", {"reviews": frame}, sample=12).wait()
    assert sample.estimate_subtasks() == 12  # the estimate counts what will be called
    sample.start().wait(60)
    assert counting.workers == 12 and counting.manager == 1
    result = sample.result
    assert len(result) == 12 and set(result.index) <= set(frame.index)
    assert list(result.index) == sorted(result.index)  # spread over the table, in table order
    assert result.index[0] < "r020" and result.index[-1] > "r180"
    assert "preview" not in result.attrs  # a map over a sample is the answer for those rows
    # The same sample comes back each time (seeded), and is answered from the store.
    again = session.plan("Label {reviews}", {"reviews": frame}, sample=12).wait()
    again.start().wait(60)
    assert list(again.result.index) == list(result.index) and counting.workers == 12
    whole = session.run_all(sample).wait(60)
    assert whole.state == "done" and len(whole.result) == 200
    assert counting.workers == 200 and counting.manager == 1  # 188 more calls, no new plan
    assert whole.from_store == 12
    pd.testing.assert_series_equal(whole.result.loc[result.index, "mood"], result["mood"])


def test_sample_forms_and_bad_ones():
    assert Sample.parse("20") == Sample(20) and Sample.parse("head:5") == Sample(5, "head")
    assert Sample(5, "head").positions(100) == [0, 1, 2, 3, 4]
    assert Sample(3).positions(2) == [0, 1]
    spread = Sample(10).positions(1000)
    assert spread == Sample(10).positions(1000) and len(set(p // 100 for p in spread)) == 10
    for bad in ("0", "ten", "head:", "-3"):
        with pytest.raises(UserInputError, match="--sample 20"):
            Sample.parse(bad)


def test_a_reduce_over_a_sample_is_marked_as_a_preview(fake_server, registry, tmp_path):
    plan = {
        "summary": "count",
        "stages": [
            PLAN["stages"][0],
            {
                "id": "total",
                "kind": "reduce",
                "source": "label",
                "group_by": [],
                "fan_in": 50,
                "instruction": "How many are good?",
                "outputs": [{"name": "good", "type": "integer"}],
                "tools": [],
                "depends_on": ["label"],
            },
        ],
        "output": "total",
    }

    def worker(body: dict[str, Any]) -> Reply:
        items = worker_input(body)
        if isinstance(items, list):
            return Reply.json({"good": sum(1 for item in items if item.get("mood") == "good")})
        return mood(body)

    server = fake_server(Counting(worker, plan))
    run = session_for(server, registry, cache_dir=str(tmp_path)).plan(
        "Count {reviews}", {"reviews": reviews(90)}, sample="head:9"
    )
    run.wait(60).start().wait(60)
    assert run.state == "done"
    assert run.result.attrs["apwa_preview"] == (
        "a sample (--sample head:9): 9 of 90 rows of reviews; its reduce combined only the "
        "sampled rows"
    )
    from apwa_jupyter.display import run_text

    assert "preview: a sample (--sample head:9)" in run_text(run)


class Gate:
    """Answers the first `free` worker requests at once; the rest wait until `opened` is set.

    The wait is the reply's `hold`, awaited by the server: blocking here, in the responder,
    stopped the server's event loop, so an earlier answer could stay unsent (CI saw 3 of 4).
    """

    def __init__(self, free: int):
        self.free, self.seen, self.lock = free, 0, threading.Lock()
        self.opened = threading.Event()

    def __call__(self, body: dict[str, Any]) -> Reply:
        with self.lock:
            self.seen += 1
            mine = self.seen
        reply = mood(body)
        if mine > self.free:
            reply.hold = self.opened
        return reply


def test_partial_and_latest_show_answers_while_the_run_works(fake_server, registry):
    gate = Gate(free=8)
    server = fake_server(Counting(gate, PLAN))
    session = session_for(server, registry, store=False, concurrency=4)
    run = session.plan("Label {reviews}", {"reviews": reviews(40)}, concurrency=4).wait(60)
    assert run.partial().empty
    run.start()
    for _ in range(600):  # the first 8 answers are folded in as they come back
        if len(run.partial()) == 8:
            break
        time.sleep(0.05)
    partial = run.partial()
    assert run.state == "running" and len(partial) == 8
    assert list(partial.columns) == ["text", "mood"] and partial.index.name == "id"
    assert partial["mood"].tolist() == [
        "good" if int(i[1:]) % 3 == 0 else "bad" for i in partial.index
    ]
    latest = run.latest(3)
    assert len(latest) == 3 and set(latest.index) <= set(partial.index)
    assert list(latest.columns) == ["text", "mood"]
    gate.opened.set()
    run.wait(60)
    assert len(run.partial()) == 40 and run.partial().equals(run.result)


def test_explain_shows_what_one_row_was_sent_and_answered(fake_server, registry, tmp_path):
    server = fake_server(Counting(mood, PLAN))
    session = session_for(server, registry, cache_dir=str(tmp_path))
    run = session.run("Label {reviews}", {"reviews": reviews(6)})
    story = run.explain("r003")
    text = str(story)
    assert "row 'r003' of stage 'label'" in text and "subtask label/3: ok" in text
    roles = [m["role"] for m in story.messages]
    assert roles[0] == "system" and "user" in roles and roles[-1] == "assistant"
    user = next(m["content"] for m in story.messages if m["role"] == "user")
    assert "review 3 great" in user and "<data>" in user  # the data block, exactly as sent
    assert "review 4" not in user  # only its own row
    assert 'one of "good", "bad"' in story.messages[0]["content"]  # the choices, in system
    assert "prompt +" in text and "completion tokens" in text and "sk-" not in text
    assert run.transcript("r003") == text  # a row label works where an id is expected
    with pytest.raises(KeyError, match="labelled like 'r000'"):
        run.explain("nope")
    with pytest.raises(KeyError, match=r"ids look like \['label/0'"):
        run.transcript("label/99")
    stored = session_for(server, registry, cache_dir=str(tmp_path)).run(
        "Label {reviews}", {"reviews": reviews(6)}
    )
    assert f"computed by run {run.id}" in str(stored.explain("r003"))


def test_compare_two_versions_and_evaluate_against_labels(fake_server, registry, tmp_path):
    strict = map_plan(
        "reviews",
        "Is this review clearly positive? {text}",
        [{"name": "mood", "type": "string", "choices": ["good", "bad"]}],
    )

    def stricter(body: dict[str, Any]) -> Reply:
        text = worker_input(body)["text"]
        number = int(text.split()[1])
        return Reply.json({"mood": "good" if "great" in text and number % 2 == 0 else "bad"})

    frame = reviews(30)
    first = session_for(fake_server(Counting(mood, PLAN)), registry, store=False).run(
        "Label {reviews}", {"reviews": frame}
    )
    second = session_for(fake_server(Counting(stricter, strict)), registry, store=False).run(
        "Label {reviews}", {"reviews": frame}
    )
    diff = first.compare(second)
    odd_great = [f"r{i:03d}" for i in range(30) if i % 3 == 0 and i % 2 == 1]
    assert list(diff.index) == odd_great and diff.attrs["differ"] == {"mood": len(odd_great)}
    assert diff[("mood", first.id)].tolist() == ["good"] * len(odd_great)
    assert diff[("mood", second.id)].tolist() == ["bad"] * len(odd_great)
    assert "-[label map] Is this review positive?" in diff.attrs["instruction_diff"]
    assert "+[label map] Is this review clearly positive?" in diff.attrs["instruction_diff"]
    confusion = diff.attrs["confusion"]["mood"]
    assert confusion.loc["good", "bad"] == len(odd_great) and confusion.loc["bad", "bad"] == 20

    truth = pd.DataFrame(
        {"mood": ["good" if i % 3 == 0 else "bad" for i in range(0, 30, 2)]},
        index=[f"r{i:03d}" for i in range(0, 30, 2)],
    )
    scores = second.evaluate(truth)
    assert scores.loc["mood", "n"] == 15 and scores.loc["mood", "accuracy"] == 1.0
    scores = first.evaluate(truth.assign(mood=["bad"] * 15))
    per_class = scores.attrs["per_class"]["mood"]
    assert scores.loc["mood", "accuracy"] == pytest.approx(10 / 15)
    assert per_class.loc["bad", "recall"] == pytest.approx(10 / 15)
    with pytest.raises(UserInputError, match="none of the output columns"):
        first.evaluate(pd.DataFrame({"other": [1]}, index=["r000"]))


def test_the_magic_samples_runs_all_and_diffs(ip, capsys):  # noqa: F811 (the ip fixture)
    ip.user_ns["reviews"] = reviews(20)
    apwa(ip, "--out labels --sample 4 --yes --wait", "For every review in {reviews}, count.")
    sample = ip.user_ns["_apwa"]
    assert len(ip.user_ns["labels"]) == 4 and sample.sample == Sample(4)
    ip.run_line_magic("apwa", f"run-all {sample.id}")
    whole = ip.user_ns["_apwa"]
    assert whole is not sample and whole.setup.parent == sample.id
    whole.wait(60)
    for _ in range(100):  # bound as soon as the run ends (the binding listener)
        if len(ip.user_ns["labels"]) == 20:
            break
        time.sleep(0.05)
    assert len(ip.user_ns["labels"]) == 20 and whole.from_store == 4
    capsys.readouterr()
    ip.run_line_magic("apwa", f"diff {sample.id} {whole.id}")
    out = capsys.readouterr().out
    assert f"{sample.id} vs {whole.id}: 4 rows in both" in out and "n_chars: 0 rows differ" in out
    ip.run_line_magic("apwa", "run-all")
    assert "ran on the whole tables already" in capsys.readouterr().out
    apwa(ip, "--sample ten", "Label {reviews}.")
    assert "sample 'ten' is not understood" in capsys.readouterr().out


def test_a_judge_scores_a_sample_of_answers_with_an_interval(fake_server, registry, tmp_path):
    judged_rows: list[str] = []

    def worker(body: dict[str, Any]) -> Reply:
        row = worker_input(body)
        if "answer_mood" in row:  # the judge: a "bad" label on a great review is wrong
            judged_rows.append(row["input_text"])
            wrong = "great" in row["input_text"] and row["answer_mood"] == "bad"
            return Reply.json({"score": 1 if wrong else 5, "reason": "r"})
        number = int(row["text"].split()[1])
        good = "great" in row["text"] and number % 6 != 0  # every 6th great review is mislabelled
        return Reply.json({"mood": "good" if good else "bad"})

    counting = Counting(worker, PLAN)
    server = fake_server(counting)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    run = session.run("Label {reviews}", {"reviews": reviews(120)})
    before = counting.workers
    verdict = run.judge("the mood matches the review", sample=30)
    assert counting.workers - before == 30 and len(judged_rows) == 30  # billed: 30 calls
    assert counting.manager == 1  # the judge is planned without the manager
    assert verdict.n == 30 and 1 <= verdict.mean < 5
    assert verdict.low < verdict.mean < verdict.high
    assert (verdict.worst["score"] == 1).all() and len(verdict.worst) == 5
    assert "95 % interval" in str(verdict)
    judge_run = session.get_run(verdict.run_id)
    assert judge_run.cost_estimate() is not None and judge_run.plan.stages[0].id == "judge"


TWO_STAGES = {
    "summary": "mood, then why",
    "stages": [
        PLAN["stages"][0] | {"id": "mood"},
        {
            "id": "why",
            "kind": "map",
            "source": "mood",
            "batch_size": 1,
            "instruction": "Say why {text} is {mood}.",
            "tools": [],
            "depends_on": ["mood"],
            "outputs": [{"name": "why", "type": "string", "description": "", "choices": []}],
        },
    ],
    "output": "why",
}


class PerStage:
    """Worker calls counted per stage (the `why` stage's instruction says "Say why")."""

    def __init__(self) -> None:
        self.calls = {"mood": 0, "why": 0, "manager": 0}
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply:
        from apwa_jupyter.testing.fake_server import is_manager_request

        text = " ".join(str(m.get("content")) for m in body["messages"])
        stage = "manager" if is_manager_request(body) else ("why" if "why" in text else "mood")
        with self.lock:
            self.calls[stage] += 1
        if stage == "manager":
            return Reply.json(TWO_STAGES)
        if stage == "why":
            return Reply.json({"why": "because"})
        return mood(body)


def test_try_sample_then_edit_reruns_only_the_edited_stage_then_run_all_bills_the_rest(
    fake_server, registry, tmp_path
):
    counted = PerStage()
    server = fake_server(counted)
    session = session_for(server, registry, cache_dir=str(tmp_path))
    run = session.plan("Label {reviews}", {"reviews": reviews(40)}).wait()
    first = run.try_sample(10).wait(60)
    assert first.state == "done" and len(first.result) == 10
    assert counted.calls == {"mood": 10, "why": 10, "manager": 1}
    assert run.state == "awaiting_approval"  # trying a sample does not start the run
    run.edit_stage("why", instruction="Say briefly why {text} is {mood}.")
    second = run.try_sample(10).wait(60)
    assert list(second.result.index) == list(first.result.index)  # the same rows
    assert counted.calls == {"mood": 10, "why": 20, "manager": 1}  # only the edited stage
    assert second.compare(first).attrs["instruction_diff"]  # the edit is what differs
    run.start().wait(60)
    assert run.state == "done" and len(run.result) == 40
    assert counted.calls == {"mood": 40, "why": 50, "manager": 1}  # the rest: 30 and 30


def test_the_magic_scores_against_labels_and_refuses_a_bad_name(ip, capsys):  # noqa: F811
    frame = reviews(8)
    ip.user_ns["reviews"] = frame
    ip.user_ns["truth"] = pd.DataFrame({"n_chars": [0] * 8}, index=frame.index)
    apwa(ip, "--out labels --labels truth --yes --wait", "For every review in {reviews}, count.")
    out = capsys.readouterr().out
    assert "against the labels:" in out and "accuracy" in out
    apwa(ip, "--labels nothing_here --yes --wait", "For every review in {reviews}, count.")
    out = capsys.readouterr().out
    assert "--labels nothing_here: no such variable" in out and "give a DataFrame" in out
    del ip.user_ns["truth"]
