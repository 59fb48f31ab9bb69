"""Cascades with an accuracy target: the bound holds over seeded repetitions, calls are counted
per model at two test servers, calibration answers are never bought twice."""

from __future__ import annotations

import math
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


# -- end to end, counted at the servers ---------------------------------------------------------
def items(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"item {i}" for i in range(n)]}, index=[f"i{i}" for i in range(n)]
    )


def session_of(cheap: Any, strong: Any, tmp_path: Any) -> Session:
    return Session(
        endpoint=EndpointConfig(base_url=cheap.base_url, model="gpt-4o-mini"),
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
