"""The magics in a real IPython shell, against a scripted server over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest
from IPython.testing import globalipapp

from apwa_jupyter.errors import UserInputError
from apwa_jupyter.testing import Reply, worker_input

from .conftest import map_plan, plan_responder

PLAN = map_plan(
    "reviews", "Count the characters of {text}", [{"name": "n_chars", "type": "integer"}]
)


@pytest.fixture(scope="module")
def shell():
    # globalipapp starts one shell per process (another module may have started it already);
    # after start_ipython the module's get_ipython returns that shell.
    globalipapp.start_ipython()
    return globalipapp.get_ipython()


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
    assert run.status == "done" and labels.attrs["apwa_run"] == run.id


def test_unknown_variable_is_one_line_naming_the_tables(ip, capsys):
    apwa(ip, "--yes", "Label {reveiws}.")
    out = capsys.readouterr().out.strip()
    assert out == "apwa: {reveiws} is not defined. Tables you can reference: {reviews}"


def test_empty_frame_is_a_clear_error_and_nothing_is_sent(ip, capsys):
    ip.user_ns["reviews"] = pd.DataFrame({"text": []})
    apwa(ip, "--yes", "Label {reviews}.")
    assert "reviews is empty (0 rows)" in capsys.readouterr().out
    assert ip.user_ns["server"].count == 0


def test_bad_option_is_one_line_with_a_suggestion(ip, capsys):
    apwa(ip, "--concurency 5", "Label {reviews}.")
    assert capsys.readouterr().out == (
        "apwa: unrecognized arguments: --concurency 5; did you mean --concurrency? "
        "(%%apwa --help lists the options)\n"
    )


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
    assert run.status == "done"
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]
    assert widget.run_button.disabled
    assert "2/2 done" in widget.progress.children[0].children[1].value
    text = widget._repr_mimebundle_()["text/plain"]
    assert "done" in text and "label (map over reviews, 2 subtasks)" in text


def test_the_run_is_apwa_from_its_cell_on_so_the_next_cell_can_edit_and_approve_it(ip):
    # A notebook (or nbconvert, where no widget is clicked) plans in one cell and approves in the
    # next: `_apwa` must be that run already while it awaits approval, not only once it ended.
    apwa(ip, "--out labels --wait", "For every review in {reviews}, count characters.")
    run = ip.user_ns["_apwa"]
    assert run.state == "awaiting_approval" and "labels" not in ip.user_ns
    run.start().wait()
    assert ip.user_ns["_apwa"] is run and ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]


def test_a_replaced_plan_is_checked_like_the_managers_and_only_before_approval(ip):
    apwa(ip, "--out labels --wait", "For every review in {reviews}, count characters.")
    run = ip.user_ns["_apwa"]
    planned = run.plan
    with pytest.raises(UserInputError, match="output 'labels' is not a stage id"):
        run.plan = {**PLAN, "output": "labels"}  # not a stage id: nothing would be bound
    assert run.plan is planned  # the refused plan replaced nothing
    run.plan = {**PLAN, "summary": "Count them."}  # a dict is validated into a Plan
    assert run.plan.summary == "Count them."
    run.start().wait()
    with pytest.raises(UserInputError, match="is done; a plan can only be replaced"):
        run.plan = planned
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]


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


# -- bad input is one line, never a traceback ------------------------------------------------------
def one_line(capsys) -> str:
    out = capsys.readouterr().out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    return out.strip()


def test_config_with_a_non_number_concurrency_is_one_line_naming_the_setting(ip, capsys):
    ip.run_line_magic("apwa", "config concurrency=abc")
    assert one_line(capsys) == (
        "apwa: concurrency='abc' is not a whole number; e.g. %apwa config concurrency=64"
    )
    ip.run_line_magic("apwa", "config concurrency=0")
    assert one_line(capsys) == "apwa: concurrency=0 must be at least 1"
    ip.run_line_magic("apwa", "config executor=spark")
    assert one_line(capsys) == "apwa: executor='spark': choose one of ray, local"
    from apwa_jupyter import magics

    assert magics._magics.session.concurrency == 64  # nothing was half-applied


def test_max_tokens_below_one_is_refused_before_anything_is_sent(ip, capsys):
    apwa(ip, "--max-tokens 0 --yes --wait", "For every review in {reviews}, count characters.")
    assert one_line(capsys).startswith("apwa: --max-tokens 0: a worker needs at least 1 token")
    assert ip.user_ns["server"].count == 0


def test_option_abbreviations_are_not_accepted(ip, capsys):
    apwa(ip, "--conc 8 --yes --wait", "For every review in {reviews}, count characters.")
    out = one_line(capsys)
    assert "unrecognized arguments: --conc 8; did you mean --concurrency?" in out
    assert ip.user_ns["server"].count == 0


def test_a_lone_surrogate_in_a_row_names_the_column_and_row_and_the_fix(ip, capsys):
    ip.user_ns["reviews"] = pd.DataFrame(
        {"text": ["fine", "broken \ud800 text"]}, index=["r1", "r2"], dtype=object
    )
    apwa(ip, "--yes --wait", "For every review in {reviews}, count characters.")
    assert one_line(capsys) == (
        "apwa: reviews: column 'text', row 'r2' has text that is not valid Unicode ('\\ud800' "
        "at character 7, a lone surrogate); clean it first, e.g. reviews['text'] = "
        "reviews['text'].str.encode('utf-8', 'replace').str.decode('utf-8')"
    )
    assert ip.user_ns["server"].count == 0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cluster stop", "apwa: %apwa cluster does not take 'stop'; usage: %apwa cluster [start]"),
        ("wait a b", "apwa: %apwa wait does not take 'a b'; usage: %apwa wait [RUN_ID]"),
        ("runs all", "apwa: %apwa runs does not take 'all'; usage: %apwa runs"),
        (
            "cancel x=1",
            "apwa: %apwa cancel takes no key=value settings; usage: %apwa cancel [RUN_ID]",
        ),
    ],
)
def test_line_commands_refuse_what_they_do_not_take_in_one_line(ip, capsys, line, expected):
    ip.run_line_magic("apwa", line)
    assert one_line(capsys) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "retry --budget zz",
            "apwa: budget 'zz' is not understood: give money ($2, 2 USD) or tokens (500k, 1.5M, "
            "20000), more than 0",
        ),
        (
            "load abc",
            "apwa: %apwa load needs --out NAME, the variable that receives the result; usage: "
            "%apwa load RUN_ID --out NAME",
        ),
        ("load abc --out 1x", "apwa: --out '1x' is not a valid Python variable name"),
        ("cache abc", "apwa: %apwa cache does not take 'abc'; usage: %apwa cache [clear [RUN_ID]]"),
    ],
)
def test_bad_line_command_values_are_one_line_before_any_session_work(ip, capsys, line, expected):
    ip.run_line_magic("apwa", line)
    assert one_line(capsys) == expected
    assert ip.user_ns["server"].count == 0


# -- %apwa approve | cancel | retry | wait | show | cluster -------------------------------------
def current_run():
    from apwa_jupyter import magics

    return magics._magics.session.runs[-1]


def test_approve_runs_the_plan_awaiting_approval_and_binds(ip, capsys):
    apwa(ip, "--out labels", "For every review in {reviews}, count characters.")
    run = current_run()
    run.wait()
    assert run.state == "awaiting_approval" and "labels" not in ip.user_ns
    ip.run_line_magic("apwa", f"approve {run.id}")
    capsys.readouterr()
    ip.run_line_magic("apwa", "wait")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"APWA run {run.id} · done")
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]
    ip.run_line_magic("apwa", "approve")  # twice: one line, not a traceback
    assert one_line(capsys) == f"apwa: run {run.id} is done, not awaiting approval"


def test_cancel_a_plan_awaiting_approval_and_an_unknown_run_id(ip, capsys):
    apwa(ip, "--out labels", "For every review in {reviews}, count characters.")
    run = current_run()
    run.wait()
    ip.run_line_magic("apwa", "cancel")
    assert run.state == "cancelled" and "labels" not in ip.user_ns
    capsys.readouterr()
    ip.run_line_magic("apwa", "cancel nosuchid")
    assert one_line(capsys).startswith("apwa: No run 'nosuchid'; runs: [")
    assert ip.user_ns["server"].count == 1  # only the plan was asked for


def test_retry_reruns_only_the_failed_rows(ip, fake_server, capsys):
    calls: dict[str, int] = {}
    broken = {"de"}  # this row fails every attempt until the test mends it

    def worker(body):
        text = worker_input(body)["text"]
        calls[text] = calls.get(text, 0) + 1
        if text in broken:
            return Reply.error(400, message="scripted: bad row")
        return Reply.json({"n_chars": len(text)})

    server = fake_server(plan_responder(PLAN, worker))
    ip.run_line_magic("apwa", f"config base_url={server.base_url} model=fake-model")
    apwa(ip, "--out labels --yes --wait", "For every review in {reviews}, count characters.")
    run = current_run()
    assert run.result["n_chars"].isna().tolist() == [False, True]
    first = dict(calls)
    broken.clear()
    ip.run_line_magic("apwa", "retry")
    ip.run_line_magic("apwa", "wait")
    assert calls["abc"] == first["abc"]  # the finished row was not asked again
    assert calls["de"] > first["de"]
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]


def test_wait_prints_the_final_state_in_one_line(ip, capsys):
    apwa(ip, "--out labels", "For every review in {reviews}, count characters.")
    run = current_run()
    run.wait()
    run.start()
    capsys.readouterr()
    ip.run_line_magic("apwa", f"wait {run.id}")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"APWA run {run.id} · done · ") and out[-1].endswith(" tokens")


def test_show_displays_the_run_again(ip, capsys):
    apwa(ip, "--out labels --yes --wait", "For every review in {reviews}, count characters.")
    run = current_run()
    capsys.readouterr()
    ip.run_line_magic("apwa", "show")
    out = capsys.readouterr().out
    assert f"APWA run {run.id} · done" in out and "label (map over reviews, 2 subtasks)" in out


def test_cluster_describes_the_local_executor_and_start_is_idempotent(ip, capsys):
    ip.run_line_magic("apwa", "cluster start")
    ip.run_line_magic("apwa", "cluster")
    out = capsys.readouterr().out
    assert out.count("executor       local") == 2 and "concurrency" in out


def test_dry_run_wait_shows_the_finished_plan(ip, capsys):
    apwa(ip, "--dry-run --wait", "For every review in {reviews}, count characters.")
    out = capsys.readouterr().out
    # the view is shown at once (planning), then refreshed with the plan once it is ready
    assert out.rstrip().count("APWA run") == 2
    last = out[out.rindex("APWA run") :]
    assert "· awaiting_approval ·" in last and "Plan: test plan" in last


# -- the user's variables ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("out", "reason"),
    [
        ("reviews", "is an input table of this cell ({reviews})"),
        ("print", "would shadow Python's builtin print"),
        ("_apwa", "is where the run itself goes"),
        ("pd", "holds the module pandas"),
        ("get_ipython", "is one of IPython's own names"),
    ],
)
def test_out_refuses_to_clobber_inputs_builtins_modules_and_the_run(ip, capsys, out, reason):
    ip.user_ns["pd"] = pd
    before = dict(ip.user_ns)
    apwa(ip, f"--out {out} --yes --wait", "For every review in {reviews}, count characters.")
    assert one_line(capsys) == (
        f"apwa: --out {out} {reason}; choose another name, e.g. --out {out}_result"
    )
    assert ip.user_ns["server"].count == 0  # refused before planning
    assert all(ip.user_ns.get(k) is v for k, v in before.items() if k != "_")
    ip.user_ns.pop("pd")


def test_out_over_an_existing_variable_says_what_it_replaced(ip, capsys):
    ip.user_ns["labels"] = "my notes"
    apwa(ip, "--out labels --yes --wait", "For every review in {reviews}, count characters.")
    run = current_run()
    assert ip.user_ns["labels"]["n_chars"].tolist() == [3, 2]
    assert f"apwa: labels now holds run {run.id}'s result (it held a str of length 8)" in (
        capsys.readouterr().out.splitlines()
    )


def test_a_run_never_binds_over_a_name_the_user_reassigned_since_the_cell_ran(ip, capsys):
    apwa(ip, "--out labels", "For every review in {reviews}, count characters.")
    run = current_run()
    run.wait()
    ip.user_ns["labels"] = mine = ["the user's own value"]  # after the cell, before the run ends
    run.start()
    ip.run_line_magic("apwa", "wait")
    assert ip.user_ns["labels"] is mine
    assert ip.user_ns["_apwa"] is run and run.result["n_chars"].tolist() == [3, 2]
    assert (
        f"apwa: run {run.id} did not bind labels: it was re-assigned after the cell ran; "
        "the result is in _apwa.result"
    ) in capsys.readouterr().out.splitlines()


def test_a_dollar_budget_is_not_expanded_by_ipython(ip, capsys):
    """IPython expands $name in magic lines; `--budget $2` must stay two dollars."""
    from apwa_jupyter.parsers import parse_cell_options

    seen: list[str] = []
    original = parse_cell_options

    def spy(line: str):
        seen.append(line)
        return original(line)

    import apwa_jupyter.magics as magics_module

    magics_module.parse_cell_options = spy
    try:
        ip.run_cell_magic("apwa", "--dry-run --budget $2 --executor local", "Label {nothing}.")
    finally:
        magics_module.parse_cell_options = original
    assert seen == ["--dry-run --budget $2 --executor local"]


def test_record_then_replay_a_cell_offline(ip, tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    apwa(ip, f"--out first --yes --wait --record {path}", "Count the characters of {reviews}.")
    first = ip.user_ns["first"].copy()
    assert first["n_chars"].notna().all() and path.exists()
    assert "sk-SECRET123" not in path.read_text()
    ip.user_ns["server"].stop()  # no model from here on
    ip.run_line_magic("apwa", "config base_url=http://127.0.0.1:9/v1")  # nothing listens there
    apwa(ip, f"--out again --yes --wait --replay {path}", "Count the characters of {reviews}.")
    pd.testing.assert_frame_equal(ip.user_ns["again"], first, check_like=True)
    capsys.readouterr()
    apwa(ip, f"--out third --yes --wait --replay {path}", "Count the words of {reviews}.")
    out = capsys.readouterr().out
    assert "record again" in out.lower() or "--record" in out
    for name in ("first", "again", "third"):
        ip.user_ns.pop(name, None)


def test_rows_without_a_value_are_counted_by_kind_and_a_cancel_does_not_unfold_them():
    from apwa_jupyter.execution import Failure
    from apwa_jupyter.widget import MAX_ERRORS_SHOWN, errors_html

    cancelled = [
        Failure("label", f"label/{i}", "cancelled", "cancelled", 0, (i,)) for i in range(400)
    ]
    shown = errors_html(cancelled)
    assert shown.startswith("<details>")  # collapsed: the user stopped it, nothing went wrong
    assert "400 subtasks without a value (400 cancelled)" in shown
    assert f"and {400 - MAX_ERRORS_SHOWN} more</small><br>" in shown
    broken = [Failure("label", "label/7", "output", "not valid JSON", 3, (7,)), *cancelled[:3]]
    shown = errors_html(broken)
    assert shown.startswith("<details open>")
    assert "4 subtasks without a value (3 cancelled, 1 output)" in shown
    assert errors_html([]) == ""
