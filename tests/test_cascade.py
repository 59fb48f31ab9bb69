"""Cascades with an accuracy target: the bound holds over seeded repetitions, calls are counted
per model at two test servers, calibration answers are never bought twice."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest

from apwa_jupyter.config import EndpointConfig
from apwa_jupyter.display import run_text
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.execution.cascade import Cascade, agreement_bound, choose_threshold
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.testing.cascade_models import ColourModel, truth

from .conftest import FAST_RETRY


# -- the statistics, simulated -----------------------------------------------------------------
def simulate(informative: bool, target: float, rng: np.random.Generator) -> tuple[float, float]:
    """(achieved agreement with the strong model, share sent to it) for one seeded repetition."""
    n, m = 20_000, 500
    right = rng.random(n) < 0.85
    if informative:
        confidence = np.where(right, rng.beta(8, 2, n), rng.beta(2, 5, n)).round(2)
    else:
        confidence = np.full(n, 0.9)
    calib = rng.choice(n, m, replace=False)
    threshold, _ = choose_threshold(confidence[calib], right[calib], target, 0.05)
    sure = confidence >= (threshold if threshold is not None else np.inf)
    sure[calib] = False  # calibration rows keep the strong answer
    achieved = 1 - float((sure & ~right).sum()) / n
    return achieved, 1 - float(sure.mean())


@pytest.mark.parametrize("target", [0.90, 0.95])
def test_the_target_holds_in_at_least_1_minus_delta_of_seeded_repetitions(target):
    rng = np.random.default_rng(7)
    outcomes = [simulate(True, target, rng) for _ in range(300)]
    misses = sum(1 for achieved, _ in outcomes if achieved < target)
    assert misses / len(outcomes) <= 0.05, misses  # delta = 0.05, counted
    shares = [share for _, share in outcomes]
    assert np.mean(shares) < 0.6  # informative confidences keep most rows on the cheap model


def test_useless_confidences_send_everything_to_the_strong_model():
    rng = np.random.default_rng(3)
    for _ in range(20):
        achieved, share = simulate(False, 0.95, rng)
        assert share == 1.0 and achieved == 1.0


def test_the_agreement_bound_is_a_clopper_pearson_lower_limit():
    assert agreement_bound(0, 500, 0.05) == pytest.approx(1 - 0.00597, abs=2e-4)
    upper = 1 - agreement_bound(10, 500, 0.05)  # P(Binomial(500, upper) <= 10) = 0.05, exactly
    tail = sum(math.comb(500, i) * upper**i * (1 - upper) ** (500 - i) for i in range(11))
    assert tail == pytest.approx(0.05, abs=1e-6)


def test_cascade_options_are_checked():
    with pytest.raises(UserInputError, match="cheap first"):
        Cascade.parse("fast")
    with pytest.raises(UserInputError, match="a target in"):
        Cascade.parse("fast,strong", target=1.2)
    with pytest.raises(UserInputError, match="not a configured model"):
        Cascade.parse("fast,strong").check({"fast": object()})
    from apwa_jupyter.parsers import parse_config_settings

    assert parse_config_settings({"logprobs": "true"}) == {"logprobs": True}
    with pytest.raises(UserInputError, match="give true or false"):
        parse_config_settings({"logprobs": "maybe"})


# -- end to end, counted at the servers ---------------------------------------------------------
def items(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"item {i}" for i in range(n)]}, index=[f"i{i}" for i in range(n)]
    )


def session_of(cheap: Any, strong: Any, tmp_path: Any, logprobs: bool = False) -> Session:
    return Session(
        endpoint=EndpointConfig(base_url=cheap.base_url, model="gpt-4o-mini", logprobs=logprobs),
        endpoints={"strong": EndpointConfig(base_url=strong.base_url, model="gpt-4o")},
        executor=LocalExecutor(concurrency=32, retry=FAST_RETRY),
        cache_dir=str(tmp_path),
    )


@pytest.mark.parametrize("kind", ["informative", "useless"])
def test_a_cascade_routes_unsure_rows_to_the_strong_model(fake_server, tmp_path, kind):
    cheap_model, strong_model = ColourModel(kind), ColourModel("strong")
    cheap, strong = fake_server(cheap_model), fake_server(strong_model)
    session = session_of(cheap, strong, tmp_path)
    frame = items(1200)
    run = session.run("Colour of {items}", {"items": frame}, cascade="default,strong", target=0.90)
    assert run.state == "done", run.status
    report = run.cascade()
    assert cheap_model.calls == 3 * 1200  # three samples a row on the cheap model
    strong_rows = len(strong_model.rows)
    assert strong_model.calls == strong_rows  # calibration answers are never bought twice
    assert strong_rows == round(report["strong_share"] * 1200)
    assert report["calibration_rows"] == 500
    answers = run.result["colour"]
    agreement = float((answers == frame["text"].map(truth)).mean())
    assert agreement >= 0.90
    by = run.result.attrs["apwa_answered_by"]
    assert sum(1 for b in by if b == "strong") == strong_rows
    if kind == "informative":
        assert report["informative"] and report["threshold"] in (pytest.approx(2 / 3), 1.0)
        assert 0.1 < report["strong_share"] < 0.6
        assert report["cost_usd"] < report["all_strong_usd"]
    else:
        assert not report["informative"] and report["strong_share"] == 1.0
        assert "did not separate right from wrong" in run_text(run)  # and says so
    calls = (cheap_model.calls, strong_model.calls)
    session.run("Colour of {items}", {"items": frame}, cascade="default,strong", target=0.90)
    assert (cheap_model.calls, strong_model.calls) == calls  # a re-run bills nothing


def test_a_cascade_chosen_for_one_stage_before_run_and_kept_by_preview_and_run_all(
    fake_server, tmp_path
):
    """`edit_stage(cascade=)` in Python (the widget's cascade box calls it): counted per model."""
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    cheap, strong = fake_server(cheap_model), fake_server(strong_model)
    session = session_of(cheap, strong, tmp_path)
    frame = items(600)
    run = session.plan("Colour of {items}", {"items": frame}).wait()
    assert run.cascade_of("label") is None  # no --cascade: one model
    with pytest.raises(UserInputError, match="not a configured model"):
        run.edit_stage("label", cascade="default,huge")
    run.edit_stage("label", cascade="default,strong")
    assert run.cascade_of("label") == Cascade("default", "strong")
    assert "cascade default -> strong, target 0.95" in run_text(run)  # the text view says so
    tried = run.try_sample(50).wait(60)
    assert tried.cascade() is not None  # the preview is a cascade too
    assert cheap_model.calls == 3 * 50 and strong_model.calls == 50  # calibration: every row
    run.start().wait(120)
    assert run.state == "done", run.status
    report = run.cascade()
    assert report is not None and report["calibration_rows"] == 500
    assert strong_model.calls == len(strong_model.rows) < 600  # never bought twice
    assert cheap_model.calls == 3 * 600  # the preview's 50 rows came from the store


def test_a_stage_taken_out_of_a_run_wide_cascade_runs_on_the_default_model(fake_server, tmp_path):
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    session = session_of(fake_server(cheap_model), fake_server(strong_model), tmp_path)
    run = session.plan(
        "Colour of {items}", {"items": items(40)}, cascade="default,strong", target=0.9
    ).wait()
    assert run.cascade_of("label") == Cascade("default", "strong", 0.9)
    run.edit_stage("label", cascade=None)
    run.start().wait(60)
    assert run.cascade() is None and (cheap_model.calls, strong_model.calls) == (40, 0)


def test_the_widget_sets_a_stage_model_and_cascade_from_the_roster(fake_server, tmp_path):
    from apwa_jupyter.widget import PlanWidget

    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    session = session_of(fake_server(cheap_model), fake_server(strong_model), tmp_path)
    run = session.plan("Colour of {items}", {"items": items(30)}).wait()
    widget = PlanWidget(run)

    def box(css: str) -> Any:
        found = [w for w in _all(widget.stages) if css in getattr(w, "_dom_classes", ())]
        assert len(found) == 1, css
        return found[0]

    cascade = box("apwa-stage-cascade")
    assert cascade.value is None and "default,strong" in [v for _, v in cascade.options]
    cascade.value = "default,strong"  # what picking "default → strong" does
    assert run.cascade_of("label") == Cascade("default", "strong")
    box("apwa-stage-model").value = "strong"  # the whole stage on the strong model
    assert run.plan.stage("label").model == "strong"
    assert box("apwa-stage-model").value == "strong"  # the redrawn plan shows the choice
    assert box("apwa-stage-cascade").value == "default,strong"
    box("apwa-stage-cascade").value = None
    run.start().wait(60)
    assert (cheap_model.calls, strong_model.calls) == (0, 30)


def _all(widget: Any) -> list[Any]:
    children = getattr(widget, "children", ())
    return [widget, *[w for child in children for w in _all(child)]]


@pytest.mark.parametrize("kind", ["informative", "useless"])
def test_token_logprobs_give_the_confidence_from_one_cheap_call_a_row(fake_server, tmp_path, kind):
    """An endpoint that returns log-probabilities: a third of the cheap calls, same guarantees."""
    cheap_model, strong_model = ColourModel(kind), ColourModel("strong")
    cheap, strong = fake_server(cheap_model), fake_server(strong_model)
    session = session_of(cheap, strong, tmp_path, logprobs=True)
    frame = items(1200)
    run = session.run("Colour of {items}", {"items": frame}, cascade="default,strong", target=0.90)
    assert run.state == "done", run.status
    report = run.cascade()
    assert report["confidence"] == "logprobs"
    assert "confidence from token log-probabilities" in run_text(run)
    assert cheap_model.calls == 1200 == report["cheap_calls"]  # one call a row, no samples
    assert strong_model.calls == len(strong_model.rows) == report["strong_calls"]
    agreement = float((run.result["colour"] == frame["text"].map(truth)).mean())
    assert agreement >= 0.90
    assert "_apwa_confidence" not in run.result.columns  # the confidence is the cascade's own
    if kind == "informative":
        assert report["informative"] and 0.1 < report["strong_share"] < 0.6
    else:
        assert not report["informative"] and report["strong_share"] == 1.0
    calls = (cheap_model.calls, strong_model.calls)
    session.run("Colour of {items}", {"items": frame}, cascade="default,strong", target=0.90)
    assert (cheap_model.calls, strong_model.calls) == calls  # a re-run bills nothing


def test_an_endpoint_that_sends_no_logprobs_sends_every_row_to_the_strong_model(
    fake_server, tmp_path
):
    """Configured `logprobs=True`, but the server sends none: no confidence, no guessing."""

    def plain(body: dict[str, Any]) -> Any:
        reply = cheap_model(body)
        reply.token_logprobs = None
        return reply

    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    session = session_of(fake_server(plain), fake_server(strong_model), tmp_path, logprobs=True)
    run = session.run("Colour of {items}", {"items": items(100)}, cascade="default,strong")
    report = run.cascade()
    assert not report["informative"] and report["strong_share"] == 1.0
    assert strong_model.calls == 100


def planning_a_free_text_output(fake_server: Any, tmp_path: Any) -> Session:
    """A session whose manager adds a free-text `why` to the colour stage (no cascade for it)."""
    from apwa_jupyter.testing import Reply
    from apwa_jupyter.testing.cascade_models import PLAN
    from apwa_jupyter.testing.fake_server import is_manager_request

    with_free_text = json.loads(json.dumps(PLAN))
    with_free_text["stages"][0]["outputs"].append({"name": "why", "type": "string"})
    cheap_model = ColourModel("informative")

    def cheap(body: dict[str, Any]) -> Any:
        return Reply.json(with_free_text) if is_manager_request(body) else cheap_model(body)

    return session_of(fake_server(cheap), fake_server(ColourModel("strong")), tmp_path)


def test_a_stage_that_cannot_run_as_a_cascade_says_why_and_what_to_change(fake_server, tmp_path):
    session = planning_a_free_text_output(fake_server, tmp_path)
    run = session.plan("Colour of {items}", {"items": items(10)}, cascade="default,strong").wait()
    assert run.cascade_of("label") is None
    said = "--cascade: stage 'label' runs on one model only: its output(s) ['why'] are free text"
    assert any(n.startswith(said) for n in run.notices), run.notices
    assert said in run_text(run)
    with pytest.raises(UserInputError, match=r"free text; give them choices or remove them"):
        run.edit_stage("label", cascade="default,strong")


def test_removing_the_free_text_output_puts_the_stage_under_the_runs_cascade(fake_server, tmp_path):
    session = planning_a_free_text_output(fake_server, tmp_path)
    wide = Cascade("default", "strong", target=0.9, calibration=40)
    run = session.plan("Colour of {items}", {"items": items(100)}, cascade=wide).wait()
    assert run.notices
    kept = [o.model_dump() for o in run.plan.stage("label").outputs if o.choices]
    run.edit_stage("label", outputs=kept)
    assert run.notices == [] and run.cascade_of("label") == wide  # the notice went with it
    run.edit_stage("label", cascade="strong,default")  # other models, the run's calibration
    assert run.cascade_of("label") == Cascade("strong", "default", target=0.9, calibration=40)


def test_a_cascade_in_progress_says_which_step_it_is_in_with_that_steps_counts(
    fake_server, tmp_path
):
    import threading

    from apwa_jupyter.display import progress_text

    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    release = threading.Event()

    def held_strong(body: dict[str, Any]) -> Any:
        reply = strong_model(body)
        reply.hold = release
        return reply

    session = session_of(fake_server(cheap_model), fake_server(held_strong), tmp_path, True)
    wide = Cascade("default", "strong", target=0.9, calibration=60)
    run = session.plan("Colour of {items}", {"items": items(300)}, cascade=wide).wait()
    run.start()
    try:
        deadline = time.monotonic() + 60
        while "calibration on strong: 0/60 done" not in progress_text(run):
            assert time.monotonic() < deadline, progress_text(run)
            time.sleep(0.05)
        assert cheap_model.calls == 300  # the cheap step is over: its own counts are gone
    finally:
        release.set()
    run.wait(60)
    assert run.state == "done"
    assert progress_text(run).startswith("  label: 300/300 done")  # the stage as a whole


def test_a_cascade_keeps_the_rows_a_call_chosen_by_tokens_and_reads_each_rows_confidence(
    fake_server, tmp_path
):
    """A batched cheap step: one request per batch, each row's confidence from its own object."""
    from apwa_jupyter.testing import Reply
    from apwa_jupyter.testing.cascade_models import PLAN
    from apwa_jupyter.testing.fake_server import is_manager_request

    unsized = json.loads(json.dumps(PLAN))
    unsized["stages"][0]["batch_size"] = None  # the manager leaves it to the tokens
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")

    def cheap(body: dict[str, Any]) -> Any:
        return Reply.json(unsized) if is_manager_request(body) else cheap_model(body)

    session = session_of(fake_server(cheap), fake_server(strong_model), tmp_path, logprobs=True)
    frame = items(1200)
    run = session.plan("Colour of {items}", {"items": frame}).wait()
    rows_a_call = run.plan.stage("label").batch_size
    assert rows_a_call > 1  # chosen by tokens
    run.edit_stage("label", cascade=Cascade("default", "strong", target=0.9))
    assert run.plan.stage("label").batch_size == rows_a_call  # the cascade keeps it
    estimate = {s.stage_id: s.calls for s in run.cost_estimate().stages}
    run.start().wait(120)
    assert run.state == "done", run.status
    report = run.cascade()
    assert cheap_model.calls == math.ceil(1200 / rows_a_call) == estimate["label"]
    assert len(cheap_model.rows) == 1200  # every row asked once
    strong_rows = round(report["strong_share"] * 1200)
    assert len(strong_model.rows) == strong_rows and report["informative"]
    assert strong_model.calls < strong_rows  # the strong step batches too
    assert 0.1 < report["strong_share"] < 0.6  # the per-row confidences separated the rows
    agreement = float((run.result["colour"] == frame["text"].map(truth)).mean())
    assert agreement >= 0.90
    calls = (cheap_model.calls, strong_model.calls)
    again = session.plan("Colour of {items}", {"items": frame}).wait()
    again.edit_stage("label", cascade=Cascade("default", "strong", target=0.9))
    again.start().wait(60)
    assert (cheap_model.calls, strong_model.calls) == calls  # a re-run bills nothing
    pd.testing.assert_frame_equal(again.result, run.result)


@pytest.mark.parametrize("logprobs", [False, True], ids=["samples", "logprobs"])
def test_a_recorded_cascade_replays_offline_with_the_same_answers_and_no_request(
    fake_server, tmp_path, logprobs
):
    """--record saves both models' exchanges, each under its own name; --replay answers them all,
    and asks the cheap model the way it was recorded (log-probabilities or samples)."""
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    cheap, strong = fake_server(cheap_model), fake_server(strong_model)
    frame, path = items(900), str(tmp_path / "cascade.jsonl")
    recorded = session_of(cheap, strong, tmp_path / "a", logprobs=logprobs).run(
        "Colour of {items}", {"items": frame}, cascade="default,strong", record=path
    )
    assert recorded.state == "done", recorded.status
    calls = (cheap_model.calls, strong_model.calls)
    assert 0 < calls[1] == recorded.cascade()["strong_calls"] < 900  # the threshold routed rows

    offline = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="gpt-4o-mini")
    replaying = Session(
        endpoint=offline.model_copy(update={"logprobs": logprobs}),
        endpoints={"strong": offline.model_copy(update={"model": "gpt-4o"})},
        executor=LocalExecutor(concurrency=32, retry=FAST_RETRY),
        cache_dir=str(tmp_path / "b"),
    )
    replayed = replaying.run(
        "Colour of {items}", {"items": frame}, cascade="default,strong", replay=path
    )
    assert replayed.state == "done", replayed.status
    assert (cheap_model.calls, strong_model.calls) == calls  # not one request more
    pd.testing.assert_frame_equal(replayed.result, recorded.result)
    assert list(replayed.result.attrs["apwa_answered_by"]) == list(
        recorded.result.attrs["apwa_answered_by"]
    )
    report, again = recorded.cascade(), replayed.cascade()
    for figure in ("confidence", "threshold", "strong_share", "cheap_calls", "strong_calls"):
        assert again[figure] == report[figure], figure


def test_one_recording_keeps_each_models_answers_to_the_same_request_apart(fake_server, tmp_path):
    """The same stage recorded on the default model, then on `strong`, into one file: the request
    is byte-identical, so only the roster name tells the two exchanges apart on replay."""
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    session = session_of(fake_server(cheap_model), fake_server(strong_model), tmp_path / "a")
    frame, path = items(60), str(tmp_path / "both.jsonl")

    def on(session: Session, model: str | None, **recording: str) -> Any:
        run = session.plan("Colour of {items}", {"items": frame}, **recording).wait()
        if model:
            run.edit_stage("label", model=model)
        return run.start().wait(60)

    fast, strong = on(session, None, record=path), on(session, "strong", record=path)
    assert (cheap_model.calls, strong_model.calls) == (60, 60)
    assert not fast.result["colour"].equals(strong.result["colour"])  # the cheap one errs
    offline = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="gpt-4o-mini")
    replaying = Session(
        endpoint=offline,
        endpoints={"strong": offline.model_copy(update={"model": "gpt-4o"})},
        executor=LocalExecutor(concurrency=32, retry=FAST_RETRY),
        cache_dir=str(tmp_path / "b"),
    )
    again = on(replaying, "strong", replay=path)
    assert again.state == "done", again.status
    pd.testing.assert_frame_equal(again.result, strong.result)
    assert (cheap_model.calls, strong_model.calls) == (60, 60)


@pytest.mark.parametrize("budget", ["40k", "200k"], ids=["in-cheap-step", "in-strong-step"])
def test_a_cascade_stopped_at_its_budget_keeps_its_answers_and_retry_buys_none_twice(
    fake_server, tmp_path, budget
):
    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    session = session_of(fake_server(cheap_model), fake_server(strong_model), tmp_path, True)
    frame = items(800)
    run = session.run(
        "Colour of {items}", {"items": frame}, cascade="default,strong", target=0.9, budget=budget
    )
    assert run.state == "failed" and run.error.startswith(f"Stopped at the budget of {budget}")
    # The calls in flight are projected at the stage's mean cost; one a little longer than the
    # mean may pass the line by a few tokens, never by a call's worth.
    assert run.meter.spent_tokens <= int(budget[:-1]) * 1000 * 1.01
    assert f"spent {run.meter.spent_tokens:,} tokens" in run.error  # the figure once all settled
    stopped = (cheap_model.calls, strong_model.calls)
    if budget == "40k":  # stopped while the cheap model worked: nothing went to the strong one
        assert 0 < stopped[0] < 800 and stopped[1] == 0
    else:
        assert stopped[0] == 800 and stopped[1] > 0
    # no cheap answer is passed off as final without a threshold from a whole calibration
    by = run.result.attrs["apwa_answered_by"]
    assert all(b in ("strong", None) for b in by) and run.cascade() is None
    assert int(run.result["colour"].notna().sum()) == sum(b == "strong" for b in by)
    run.retry_failed(budget="10M").wait(120)
    assert run.status == "done", run.status
    assert cheap_model.calls == len(cheap_model.rows) == 800  # each row asked once in all
    assert strong_model.calls == len(strong_model.rows)  # never bought twice
    # the report counts what this execution asked (the calibration rows came from the store)
    assert run.cascade()["strong_calls"] == strong_model.calls - stopped[1]
    agreement = float((run.result["colour"] == frame["text"].map(truth)).mean())
    assert agreement >= 0.9


def test_a_cancelled_cascade_rerun_buys_no_answer_twice(fake_server, tmp_path):
    import threading

    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    release = threading.Event()

    def held_strong(body: dict[str, Any]) -> Any:
        reply = strong_model(body)
        if strong_model.calls > 40:  # the calibration is under way: hold the rest
            reply.hold = release
        return reply

    session = session_of(fake_server(cheap_model), fake_server(held_strong), tmp_path, True)
    frame = items(800)
    run = session.plan("Colour of {items}", {"items": frame}, cascade="default,strong").wait()
    run.start()
    deadline = time.monotonic() + 60
    while strong_model.calls <= 40:
        assert time.monotonic() < deadline and run.state == "running", run.status
        time.sleep(0.02)
    run.cancel()
    release.set()
    run.wait(60)
    assert run.state == "cancelled", run.status
    by = run.result.attrs["apwa_answered_by"]  # a part of the calibration chose no threshold
    assert all(b in ("strong", None) for b in by) and run.cascade() is None
    assert set(run.errors_frame()["kind"]) == {"cancelled"}
    again = session.run("Colour of {items}", {"items": frame}, cascade="default,strong")
    assert again.state == "done", again.status
    assert cheap_model.calls == len(cheap_model.rows) == 800
    # a held request the cancel abandoned may have been answered but not stored: asked again
    assert strong_model.calls - len(strong_model.rows) <= 32
    assert again.cascade()["calibration_rows"] == 500


def test_a_cascade_retries_a_failing_cheap_and_strong_server_and_loses_no_row(
    fake_server, tmp_path
):
    """A 500 on the first try of every 10th row, at both models: retried, answered once each."""
    import threading

    from apwa_jupyter.testing import Reply
    from apwa_jupyter.testing.fake_server import is_manager_request, worker_input

    errors = {"cheap": 0, "strong": 0}

    def flaky(model: ColourModel, name: str) -> Any:
        seen: set[str] = set()
        lock = threading.Lock()

        def respond(body: dict[str, Any]) -> Any:
            if not is_manager_request(body):
                text = worker_input(body)["text"]
                with lock:
                    first = int(text.split()[1]) % 10 == 0 and text not in seen
                    seen.add(text)
                    errors[name] += first
                if first:
                    return Reply.error(500)
            return model(body)

        return respond

    cheap_model, strong_model = ColourModel("informative"), ColourModel("strong")
    cheap, strong = flaky(cheap_model, "cheap"), flaky(strong_model, "strong")
    session = session_of(fake_server(cheap), fake_server(strong), tmp_path, logprobs=True)
    frame = items(800)
    run = session.run("Colour of {items}", {"items": frame}, cascade="default,strong", target=0.9)
    assert run.state == "done", run.status
    assert int(run.result["colour"].notna().sum()) == 800
    assert cheap_model.calls == len(cheap_model.rows) == 800  # each answered once, after a 500
    assert strong_model.calls == len(strong_model.rows)
    assert errors["cheap"] == 80  # rows 0, 10, ..., 790 failed once
    assert errors["strong"] == sum(int(t.split()[1]) % 10 == 0 for t in strong_model.rows) > 0
    assert float((run.result["colour"] == frame["text"].map(truth)).mean()) >= 0.9
