"""Which API key reaches which server: one rule, checked at the wire for every way of configuring.

The rule (config.merge_endpoint): a key belongs to the base URL it was given for. A new base URL
without a new key sends no key (the placeholder); OPENAI_API_KEY goes only to OPENAI_BASE_URL, or
to OpenAI's default URL when that is unset. Every test runs a real tiny plan through the real
`openai` client against two FakeOpenAIServers and reads the Authorization headers they recorded.
"""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from apwa_jupyter.config import (
    OPENAI_DEFAULT_BASE_URL,
    OPENAI_DEFAULT_MODEL,
    PLACEHOLDER_API_KEY,
    EndpointConfig,
    merge_endpoint,
)
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.executors.local import LocalExecutor
from apwa_jupyter.session import Session
from apwa_jupyter.templates import StageContext
from apwa_jupyter.testing import FakeOpenAIServer, Reply, worker_input

from .conftest import FAST_RETRY, map_plan, plan_responder

ENV_KEY = "sk-ENV-7f3a9c"
KEY_A = "sk-A-41b2e8"
NO_KEY = f"Bearer {PLACEHOLDER_API_KEY}"
PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)
PROMPT = "For every review in {reviews}, count characters."
REVIEWS = pd.DataFrame({"text": ["abc", "de"]}, index=["r1", "r2"])


def count_chars(body: dict[str, Any]) -> Reply:
    return Reply.json({"n_chars": len(worker_input(body)["text"])})


@pytest.fixture
def servers(fake_server) -> tuple[FakeOpenAIServer, FakeOpenAIServer]:
    """Two servers that answer the same plan: A (the "home" URL) and B (some other host)."""
    return (
        fake_server(plan_responder(PLAN, count_chars)),
        fake_server(plan_responder(PLAN, count_chars)),
    )


def local_session(**options: Any) -> Session:
    return Session(executor=LocalExecutor(concurrency=4, retry=FAST_RETRY), **options)


def run_tiny(session: Session) -> None:
    """One plan request and two worker requests; all must succeed."""
    run = session.run(PROMPT, {"reviews": REVIEWS})
    assert run.status == "done", run.error
    assert run.result is not None and run.result["n_chars"].tolist() == [3, 2]


def sent(server: FakeOpenAIServer) -> set[str | None]:
    """The distinct Authorization headers the server received (3 requests per tiny run)."""
    assert len(server.authorizations) == server.count
    return set(server.authorizations)


# -- the rule, as a pure function ------------------------------------------------------------------
A_URL, B_URL = "http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"


def key_of(endpoint: EndpointConfig | None) -> str | None:
    assert endpoint is not None
    value = endpoint.api_key.get_secret_value()
    return None if value == PLACEHOLDER_API_KEY else value


@pytest.mark.parametrize(
    ("env", "changes", "expected"),
    [
        # env only: the env key goes to the env URL, or to OpenAI's when no env URL is set
        (
            {"OPENAI_BASE_URL": A_URL, "OPENAI_API_KEY": ENV_KEY, "APWA_MODEL": "m"},
            {},
            (A_URL, ENV_KEY),
        ),
        ({"OPENAI_API_KEY": ENV_KEY}, {}, (OPENAI_DEFAULT_BASE_URL, ENV_KEY)),
        # an explicit other URL never inherits the env key
        ({"OPENAI_API_KEY": ENV_KEY}, {"base_url": B_URL, "model": "m"}, (B_URL, None)),
        (
            {"OPENAI_BASE_URL": A_URL, "OPENAI_API_KEY": ENV_KEY},
            {"base_url": B_URL, "model": "m"},
            (B_URL, None),
        ),
        # ... but the env URL itself (trailing slash and all) is where the env key belongs
        (
            {"OPENAI_BASE_URL": A_URL, "OPENAI_API_KEY": ENV_KEY},
            {"base_url": A_URL + "/", "model": "m"},
            (A_URL, ENV_KEY),
        ),
        # a key given together with a URL belongs to that URL
        (
            {"OPENAI_API_KEY": ENV_KEY},
            {"base_url": B_URL, "api_key": KEY_A, "model": "m"},
            (B_URL, KEY_A),
        ),
        # nothing at all: the embedded model
        ({}, {}, None),
    ],
)
def test_merge_endpoint_from_nothing(env, changes, expected):
    endpoint = merge_endpoint(None, env=env, **changes)
    if expected is None:
        assert endpoint is None
    else:
        assert endpoint is not None and (endpoint.base_url, key_of(endpoint)) == expected


def test_merge_endpoint_onto_a_configured_endpoint():
    env = {"OPENAI_BASE_URL": B_URL, "OPENAI_API_KEY": ENV_KEY}
    current = merge_endpoint(None, base_url=A_URL, api_key=KEY_A, model="m", env=env)
    assert current is not None and key_of(current) == KEY_A
    assert key_of(merge_endpoint(current, model="other", env=env)) == KEY_A  # same URL: kept
    moved = merge_endpoint(current, base_url=B_URL, env={})
    assert moved is not None and (moved.base_url, key_of(moved), moved.model) == (B_URL, None, "m")
    # back home to the env URL: the env key, never the key given for A
    assert key_of(merge_endpoint(current, base_url=B_URL, env=env)) == ENV_KEY
    rekeyed = merge_endpoint(moved, api_key="sk-B", env=env)
    assert rekeyed is not None and (rekeyed.base_url, key_of(rekeyed)) == (B_URL, "sk-B")
    assert merge_endpoint(None, api_key=KEY_A, env={}).model == OPENAI_DEFAULT_MODEL  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["nonsense", "ftp://x", "http://", ""])
def test_bad_base_url_is_a_user_input_error(bad):
    with pytest.raises(UserInputError, match="base_url") as info:
        merge_endpoint(None, base_url=bad, model="m", env={})
    assert "\n" not in str(info.value)


# -- each way of configuring, at the wire ----------------------------------------------------------
def test_env_key_goes_to_the_env_base_url(servers, monkeypatch):
    a, b = servers
    monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    run_tiny(local_session())
    assert sent(a) == {f"Bearer {ENV_KEY}"} and a.count == 3
    assert b.count == 0


def test_env_key_is_not_sent_to_a_configured_base_url(servers, monkeypatch):
    _, b = servers
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)  # its home is api.openai.com
    session = local_session()
    session.configure(base_url=b.base_url, model="fake-model")
    run_tiny(session)
    assert sent(b) == {NO_KEY} and b.count == 3


def test_env_key_with_env_base_url_is_not_sent_to_another_configured_url(servers, monkeypatch):
    a, b = servers
    monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    session = local_session()
    session.configure(base_url=b.base_url, model="fake-model")
    run_tiny(session)
    assert sent(b) == {NO_KEY} and a.count == 0


def test_a_new_base_url_drops_the_key_given_for_the_old_one(servers):
    a, b = servers
    session = local_session()
    session.configure(base_url=a.base_url, api_key=KEY_A, model="fake-model")
    run_tiny(session)
    session.configure(base_url=b.base_url)
    run_tiny(session)
    assert sent(a) == {f"Bearer {KEY_A}"} and a.count == 3
    assert sent(b) == {NO_KEY} and b.count == 3


def test_changing_only_the_model_keeps_the_key(servers):
    a, _ = servers
    session = local_session()
    session.configure(base_url=a.base_url, api_key=KEY_A, model="fake-model")
    session.configure(model="another-model")
    run_tiny(session)
    assert sent(a) == {f"Bearer {KEY_A}"} and a.count == 3
    assert {r["model"] for r in a.requests} == {"another-model"}


def test_a_key_alone_goes_to_the_configured_base_url(servers, monkeypatch):
    a, b = servers
    monkeypatch.setenv("OPENAI_BASE_URL", b.base_url)
    session = local_session()
    session.configure(base_url=a.base_url, model="fake-model")
    session.configure(api_key=KEY_A)
    run_tiny(session)
    assert sent(a) == {f"Bearer {KEY_A}"} and b.count == 0


def test_bad_base_url_in_configure_is_one_line(servers):
    session = local_session()
    with pytest.raises(UserInputError, match="http://") as info:
        session.configure(base_url="nonsense", model="m")
    assert "\n" not in str(info.value)


# -- through the magics in a real IPython shell ----------------------------------------------------
@pytest.fixture(scope="module")
def shell():
    from IPython.testing import globalipapp

    globalipapp.start_ipython()  # once per process; the module then hands out the shell
    return globalipapp.get_ipython()


@pytest.fixture
def magics(shell, capsys):
    """A freshly loaded %apwa with the local executor; traitlets may be set before first use."""
    import apwa_jupyter.magics as magics_module

    shell.run_line_magic("load_ext", "apwa_jupyter")
    loaded = magics_module._magics
    assert loaded is not None
    loaded.executor = "local"
    shell.user_ns["reviews"] = REVIEWS
    capsys.readouterr()
    yield loaded
    shell.run_line_magic("unload_ext", "apwa_jupyter")
    for name in ("reviews", "labels", "_apwa"):
        shell.user_ns.pop(name, None)


def cell(shell, line: str) -> None:
    shell.run_cell_magic("apwa", f"{line} --yes --wait --out labels", PROMPT)
    assert shell.user_ns["_apwa"].state == "done", shell.user_ns["_apwa"].error


def test_per_cell_base_url_never_gets_the_env_key(servers, monkeypatch, shell, magics):
    a, b = servers
    monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    cell(shell, f"--base-url {b.base_url}")
    cell(shell, "")  # no override: the env endpoint, with its key
    cell(shell, "--model other-model")  # same URL, other model: still the env key
    assert sent(b) == {NO_KEY} and b.count == 3
    assert sent(a) == {f"Bearer {ENV_KEY}"} and a.count == 6


def test_per_cell_base_url_never_gets_the_configured_key(servers, shell, magics):
    a, b = servers
    shell.run_line_magic("apwa", f"config base_url={a.base_url} model=fake-model api_key={KEY_A}")
    cell(shell, f"--base-url {b.base_url}")
    cell(shell, "--model other-model")
    assert sent(b) == {NO_KEY} and b.count == 3
    assert sent(a) == {f"Bearer {KEY_A}"} and a.count == 3


def test_traitlet_base_url_never_gets_the_env_key(servers, monkeypatch, shell, magics):
    _, b = servers
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    magics.base_url = b.base_url
    magics.model = "fake-model"
    cell(shell, "")
    assert sent(b) == {NO_KEY} and b.count == 3


def test_config_base_url_keeps_neither_the_old_nor_the_env_key(servers, monkeypatch, shell, magics):
    a, b = servers
    monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    shell.run_line_magic("apwa", f"config api_key={KEY_A} model=fake-model")
    cell(shell, "")
    shell.run_line_magic("apwa", f"config base_url={b.base_url}")
    cell(shell, "")
    assert sent(a) == {f"Bearer {KEY_A}"} and a.count == 3
    assert sent(b) == {NO_KEY} and b.count == 3


def test_bad_base_urls_in_the_magics_are_one_line(servers, shell, magics, capsys):
    a, b = servers
    shell.run_cell_magic("apwa", "--base-url ftp://x --model m --yes", PROMPT)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apwa: ") and "ftp://x" in lines[0]
    shell.run_line_magic("apwa", "config base_url=nonsense")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apwa: ") and "nonsense" in lines[0]
    assert a.count == b.count == 0


# -- inside Ray --------------------------------------------------------------------------------------
@pytest.mark.ray
def test_ray_key_travels_inline_never_through_the_object_store(servers, ray_executor, monkeypatch):
    import ray

    a, _ = servers
    key = "sk-RAY-c0ffee5150"
    put: list[bytes] = []
    real_put = ray.put

    def spy(value: Any, *args: Any, **kwargs: Any) -> Any:
        put.append(pickle.dumps(value))
        return real_put(value, *args, **kwargs)

    monkeypatch.setattr(ray, "put", spy)
    endpoint = EndpointConfig(base_url=a.base_url, model="fake-model", api_key=key)  # type: ignore[arg-type]
    session = Session(endpoint=endpoint, executor=ray_executor)
    run = session.run(PROMPT, {"reviews": REVIEWS})
    assert run.status == "done", run.error
    assert run.result is not None and run.result["n_chars"].tolist() == [3, 2]
    assert sent(a) == {f"Bearer {key}"} and a.count == 3  # the workers did send it
    assert len(put) == 2  # one table, one stage context
    assert not [blob for blob in put if key.encode() in blob]
    # What the actors read back from the store has no key; the handle keeps it for the calls.
    ctx = StageContext("r", "s", "map", "Do it.", (), {}, endpoint)
    handle = asyncio.run(ray_executor.put_stage(ctx))
    stored = ray.get(handle.ref)
    assert stored.model.key() is None and stored.model.base_url == a.base_url
    assert key.encode() not in pickle.dumps(stored)
    assert handle.api_key == key


# -- nowhere in the notebook, plans, summaries, transcripts or logs ---------------------------------
PROBE = """\
import json, os, pickle
key = os.environ["OPENAI_API_KEY"]
run = _apwa
places = {
    "plan": [repr(run.plan), str(run.plan), pickle.dumps(run.plan)],
    "summary": [repr(run.summary()), str(run.summary()), pickle.dumps(run.summary())],
    "transcripts": [run.transcript(r.subtask.id) for rs in run.subtask_results.values() for r in rs]
    + [pickle.dumps(run.subtask_results)],
    "run": [repr(run), str(run), run.endpoint_description],
    "result": [repr(run.result), pickle.dumps(run.result), pickle.dumps(labels)],
    "logs": [_apwa_log.getvalue()],
}
leaks = [name for name, values in places.items()
         if any((key.encode() if isinstance(v, bytes) else key) in v for v in values)]
print(json.dumps({"state": run.state, "transcripts": len(places["transcripts"]) - 1,
                  "logged": len(_apwa_log.getvalue()), "leaks": leaks}))
"""
LOG_CAPTURE = """\
import io, logging
_apwa_log = io.StringIO()
_handler = logging.StreamHandler(_apwa_log)
_handler.setLevel(logging.DEBUG)
logging.getLogger().addHandler(_handler)
logging.getLogger().setLevel(logging.DEBUG)
"""


@pytest.mark.slow
def test_key_is_nowhere_in_the_notebook_plans_summaries_transcripts_or_logs(
    servers, monkeypatch, tmp_path
):
    import nbformat

    from apwa_jupyter.demo import execute, text_outputs

    a, _ = servers
    key = "sk-NOTEBOOK-d15t1nct1ve"
    monkeypatch.setenv("OPENAI_BASE_URL", a.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("APWA_MODEL", "fake-model")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(LOG_CAPTURE),
        nbformat.v4.new_code_cell("%load_ext apwa_jupyter\n%apwa config executor=local"),
        nbformat.v4.new_code_cell(
            "import pandas as pd\nreviews = pd.DataFrame({'text': ['abc', 'de']}, index=['r1', 'r2'])"
        ),
        nbformat.v4.new_code_cell(f"%%apwa --out labels --yes --wait\n{PROMPT}"),
        nbformat.v4.new_code_cell("%apwa runs\n%apwa config\nlabels"),
        nbformat.v4.new_code_cell(PROBE),
    ]
    source = tmp_path / "keys.ipynb"
    saved = tmp_path / "keys.out.ipynb"
    nbformat.write(notebook, source)
    executed = execute(str(source), str(saved), timeout=300)
    report = json.loads(text_outputs(executed)[-1].strip().splitlines()[-1])
    assert report["state"] == "done" and report["transcripts"] == 2 and report["logged"] > 0
    assert report["leaks"] == []
    assert sent(a) == {f"Bearer {key}"} and a.count == 3  # the key did reach its server
    text = Path(saved).read_text()
    assert "widgets" in json.loads(text)["metadata"]  # widget state is part of what we checked
    assert key not in text
