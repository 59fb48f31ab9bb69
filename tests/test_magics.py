"""The magics in a real IPython shell, against a scripted server over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from IPython.testing.globalipapp import get_ipython

from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan, plan_responder

PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)


@pytest.fixture(scope="module")
def shell():
    # globalipapp starts one shell per process; later calls may return None, so keep it.
    return get_ipython()


@pytest.fixture
def ip(shell, fake_server, capsys):
    server = fake_server(
        plan_responder(PLAN, lambda body: Reply.json({"n_chars": len(worker_input(body)["text"])}))
    )
    shell.run_line_magic("load_ext", "apwa_jupyter")
    shell.run_line_magic(
        "apwa",
        f"config executor=local base_url={server.base_url} model=fake-model api_key=sk-SECRET123",
    )
    shell.user_ns["reviews"] = pd.DataFrame({"text": ["abc", "de"]}, index=["r1", "r2"])
    shell.user_ns["server"] = server
    capsys.readouterr()
    yield shell
    shell.run_line_magic("unload_ext", "apwa_jupyter")
    for name in ("reviews", "labels", "_apwa", "server", "words", "n"):
        shell.user_ns.pop(name, None)


def apwa(ip, line, cell):
    return ip.run_cell_magic("apwa", line, cell)


def test_load_ext_imports_neither_ray_nor_openai_nor_widgets():
    code = textwrap.dedent("""
        import sys
        from IPython.testing.globalipapp import get_ipython
        ip = get_ipython()
        ip.run_line_magic("load_ext", "apwa_jupyter")
        heavy = [m for m in ("ray", "openai", "ipywidgets", "pandas", "pyarrow") if m in sys.modules]
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_yes_runs_and_binds_the_result_with_the_input_index(ip):
    apwa(ip, "--out labels --yes --wait", "For every review in {reviews}, count characters.")
    labels = ip.user_ns["labels"]
    assert labels.index.tolist() == ["r1", "r2"]
    assert labels["n_chars"].tolist() == [3, 2]
    run = ip.user_ns["_apwa"]
    assert run.state == "done" and labels.attrs["apwa_run"] == run.id


def test_unknown_variable_is_one_line_naming_the_tables(ip, capsys):
    apwa(ip, "--yes", "Label {reveiws}.")
    out = capsys.readouterr().out.strip()
    assert out == "apwa: {reveiws} is not defined. Tables you can reference: {reviews}"


def test_empty_frame_is_a_clear_error_and_nothing_is_sent(ip, capsys):
    ip.user_ns["reviews"] = pd.DataFrame({"text": []})
    apwa(ip, "--yes", "Label {reviews}.")
    assert "reviews is empty (0 rows)" in capsys.readouterr().out
    assert ip.user_ns["server"].count == 0


def test_bad_option_prints_usage(ip, capsys):
    apwa(ip, "--concurency 5", "Label {reviews}.")
    out = capsys.readouterr().out
    assert "unrecognized arguments: --concurency" in out and "usage: %%apwa" in out


def test_help_documents_every_option(ip, capsys):
    apwa(ip, "--help", "(the body is ignored with --help)")
    out = capsys.readouterr().out
    for option in (
        "--out",
        "--model",
        "--base-url",
        "--address",
        "--concurrency",
        "--dry-run",
        "--yes",
        "--tools",
        "--wait",
    ):
        assert option in out


def test_dry_run_plans_but_executes_nothing(ip):
    apwa(ip, "--dry-run --wait", "For every review in {reviews}, count characters.")
    from apwa_jupyter import magics

    run = magics._magics.session.runs[-1]
    assert run.state == "awaiting_approval" and run.plan is not None
    assert ip.user_ns["server"].count == 1  # only the manager was asked
    with pytest.raises(Exception, match="dry-run"):
        run.start()


def test_approval_flow_through_the_widget_handlers(ip):
    from apwa_jupyter import magics

    apwa(ip, "--out labels", "For every review in {reviews}, count characters.")
    run = magics._magics.session.runs[-1]
    run.wait()  # planning only
    assert run.state == "awaiting_approval" and "labels" not in ip.user_ns
    widget = magics._magics._widgets[run.id]
    assert not widget.run_button.disabled
    widget.edit_instruction("label", "Count the characters in {text}, carefully.")
    assert run.plan.stages[0].instruction.endswith("carefully.")
    widget.edit_instruction("label", "Use {missing}.")  # invalid edits are refused, plan kept
    assert "placeholder {missing}" in widget.message.value
    widget.run_button.click()
    run.wait()
    widget.refresh()
    assert run.state == "done"
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]
    assert widget.run_button.disabled
    assert "2/2 done" in widget.progress.children[0].children[1].value
    text = widget._repr_mimebundle_()["text/plain"]
    assert "done" in text and "label (map over reviews, 2 subtasks)" in text


def test_scalars_are_interpolated(ip):
    ip.user_ns["n"] = 3
    apwa(ip, "--yes --wait --out labels", "For every review in {reviews}, count up to {n}.")
    server = ip.user_ns["server"]
    assert "count up to 3." in server.requests[0]["messages"][1]["content"]


def test_config_never_prints_the_api_key(ip, capsys, monkeypatch):
    ip.run_line_magic("apwa", "config")
    out = capsys.readouterr().out
    assert "SECRET123" not in out and "key set" in out
    apwa(ip, "--yes --wait --out labels", "For every review in {reviews}, count characters.")
    run = ip.user_ns["_apwa"]
    assert "SECRET123" not in repr(run.plan) + run.endpoint_description + str(run.summary())
    assert "SECRET123" not in capsys.readouterr().out


def test_unknown_tool_and_line_command_errors(ip, capsys):
    apwa(ip, "--tools nope --yes", "Label {reviews}.")
    assert "no capability named 'nope'" in capsys.readouterr().out
    ip.run_line_magic("apwa", "frobnicate")
    assert "unknown command 'frobnicate'" in capsys.readouterr().out


def test_runs_lists_this_sessions_runs(ip, capsys):
    apwa(ip, "--yes --wait --out labels", "For every review in {reviews}, count characters.")
    capsys.readouterr()
    ip.run_line_magic("apwa", "runs")
    assert "done" in capsys.readouterr().out


def test_api_key_can_be_entered_without_it_landing_in_the_notebook(ip, capsys, monkeypatch):
    import getpass

    monkeypatch.setattr(getpass, "getpass", lambda prompt: "sk-TYPED456")
    ip.run_line_magic("apwa", "config api_key")
    out = capsys.readouterr().out
    assert "TYPED456" not in out and "key set" in out
    ip.run_line_magic("apwa", "config api_key=sk-INLINE789")
    assert "will be saved with the notebook" in capsys.readouterr().out
