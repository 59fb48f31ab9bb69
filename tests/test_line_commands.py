"""`%apwa COMMAND` lines parse into one typed model per subcommand; bad input is one line."""

from __future__ import annotations

import dataclasses

import pytest

from apwa_jupyter.costs import Budget
from apwa_jupyter.errors import UserInputError
from apwa_jupyter.parsers import (
    LINE_COMMANDS,
    LINE_MODELS,
    ApproveArgs,
    CacheArgs,
    CancelArgs,
    ClusterArgs,
    ConfigArgs,
    HelpArgs,
    LoadArgs,
    RetryArgs,
    RunsArgs,
    ShowArgs,
    ToolsArgs,
    WaitArgs,
    parse_line,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", HelpArgs()),
        ("help", HelpArgs()),
        ("tools", ToolsArgs()),
        ("runs", RunsArgs()),
        ("config", ConfigArgs({}, ask_key=False)),
        ("config api_key", ConfigArgs({}, ask_key=True)),
        (
            "config model=m concurrency=8 executor=local rpm=60 base_url=http://h/v1?a=b",
            ConfigArgs(
                {
                    "model": "m",
                    "concurrency": 8,
                    "executor": "local",
                    "rpm": 60,
                    "base_url": "http://h/v1?a=b",
                },
                ask_key=False,
            ),
        ),
        ("cluster", ClusterArgs(start=False)),
        ("cluster start", ClusterArgs(start=True)),
        ("show", ShowArgs(None)),
        ("show abc123", ShowArgs("abc123")),
        ("approve abc123", ApproveArgs("abc123")),
        ("cancel", CancelArgs(None)),
        ("wait abc123", WaitArgs("abc123")),
        ("retry", RetryArgs(None, None)),
        ("retry abc123", RetryArgs("abc123", None)),
        ("retry --budget $2", RetryArgs(None, Budget("usd", 2.0))),
        ("retry abc123 --budget 500k", RetryArgs("abc123", Budget("tokens", 500_000.0))),
        ("retry --budget '2 USD' abc123", RetryArgs("abc123", Budget("usd", 2.0))),
        ("cache", CacheArgs(clear=False, run_id=None)),
        ("cache clear", CacheArgs(clear=True, run_id=None)),
        ("cache clear abc123", CacheArgs(clear=True, run_id="abc123")),
        ("load abc123 --out frame", LoadArgs("abc123", "frame")),
        ("load --out frame abc123", LoadArgs("abc123", "frame")),
    ],
)
def test_each_subcommand_parses_into_its_typed_model(line, expected):
    parsed = parse_line(line)
    assert type(parsed) is type(expected) and parsed == expected


def test_every_command_has_a_model_and_a_help_line():
    assert list(LINE_MODELS) == list(LINE_COMMANDS)
    for name, model in LINE_MODELS.items():
        assert dataclasses.is_dataclass(model) and model.usage.startswith(f"%apwa {name}")
        assert LINE_COMMANDS[name] == model.summary
    # the run commands are told apart by their class, not by a word the handler reads again
    assert len({ShowArgs, ApproveArgs, CancelArgs, WaitArgs}) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "frobnicate",
            "unknown command 'frobnicate'; one of: config, tools, cluster, runs, batches, cache, "
            "load, show, approve, run-all, diff, cancel, retry, wait, help (%apwa help)",
        ),
        ("config 'unbalanced", "cannot parse (No closing quotation); check the quotes"),
        ("help x", "%apwa help does not take 'x'; usage: %apwa help"),
        ("runs all", "%apwa runs does not take 'all'; usage: %apwa runs"),
        ("cluster stop", "%apwa cluster does not take 'stop'; usage: %apwa cluster [start]"),
        ("wait a b", "%apwa wait does not take 'a b'; usage: %apwa wait [RUN_ID]"),
        ("cancel x=1", "%apwa cancel takes no key=value settings; usage: %apwa cancel [RUN_ID]"),
        ("config foo", "%apwa config does not take 'foo'; usage: %apwa config [key=value ...]"),
        (
            "config concurrency=abc",
            "concurrency='abc' is not a whole number; e.g. %apwa config concurrency=64",
        ),
        ("config concurrency=0", "concurrency=0 must be at least 1"),
        ("config executor=spark", "executor='spark': choose one of ray, local"),
        (
            "retry --budget",
            "%apwa retry needs a LIMIT after --budget; usage: %apwa retry [RUN_ID] [--budget LIMIT]",
        ),
        (
            "retry --budget zz",
            "budget 'zz' is not understood: give money ($2, 2 USD) or tokens (500k, 1.5M, 20000), "
            "more than 0",
        ),
        (
            "retry a b",
            "%apwa retry does not take 'a b'; usage: %apwa retry [RUN_ID] [--budget LIMIT]",
        ),
        ("cache abc", "%apwa cache does not take 'abc'; usage: %apwa cache [clear [RUN_ID]]"),
        (
            "cache clear a b",
            "%apwa cache does not take 'a b'; usage: %apwa cache [clear [RUN_ID]]",
        ),
        (
            "load abc",
            "%apwa load needs --out NAME, the variable that receives the result; usage: "
            "%apwa load RUN_ID --out NAME",
        ),
        (
            "load abc --out",
            "%apwa load needs a NAME after --out; usage: %apwa load RUN_ID --out NAME",
        ),
        (
            "load --out frame",
            "%apwa load needs the RUN_ID of a stored run (%apwa runs lists them); usage: "
            "%apwa load RUN_ID --out NAME",
        ),
        ("load abc --out 1x", "--out '1x' is not a valid Python variable name"),
        ("load abc --out class", "--out 'class' is not a valid Python variable name"),
        (
            "load a b --out frame",
            "%apwa load does not take 'a b'; usage: %apwa load RUN_ID --out NAME",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_the_usage(line, message):
    with pytest.raises(UserInputError) as caught:
        parse_line(line)
    assert str(caught.value) == message and "\n" not in str(caught.value)


def test_unknown_config_setting_lists_the_known_ones():
    with pytest.raises(UserInputError) as caught:
        parse_line("config nope=1")
    assert str(caught.value) == (
        "unknown setting(s) ['nope']; known: ['address', 'api_key', 'base_url', 'cache_control', "
        "'concurrency', 'context_tokens', 'embedding_model', 'endpoint', 'executor', 'logprobs', "
        "'max_concurrency', 'model', 'rpm', 'tools', 'tpm']"
    )
