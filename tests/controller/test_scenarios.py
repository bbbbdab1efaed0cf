"""Rule scenarios: the shipped scenarios pass and cover every default rule; failures and invalid
files are reported; ``convctl rules test`` works end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.cli import main
from controller.rulebook import Matcher, Rulebook
from controller.scenarios import ScenarioError, load_scenarios, run_scenarios
from controller.settings import Settings
from controller.testing import RULES_DIR

CONVCTL = str(Path(sys.executable).parent / "convctl")
SCENARIOS = RULES_DIR / "tests"


def _settings() -> Settings:
    return Settings(rules_dir=RULES_DIR)


@pytest.mark.parametrize("matcher", ["reference", "durable"])
def test_every_shipped_scenario_passes(matcher: Matcher) -> None:
    report = run_scenarios(load_scenarios(SCENARIOS), RULES_DIR, _settings(), matcher=matcher)
    assert report.results, "no scenarios found"
    assert report.passed, "\n".join(report.lines())


def test_every_default_rule_fires_in_some_scenario() -> None:
    report = run_scenarios(load_scenarios(SCENARIOS), RULES_DIR, _settings())
    book = Rulebook.load(
        RULES_DIR / "default.yaml", settings=_settings().rule_settings(), matcher="reference"
    )
    try:
        default_rules = {rule.name for rule in book.rules}
    finally:
        book.close()
    assert default_rules, "no default rules loaded"
    assert default_rules - report.rules_fired == set()


def test_a_failing_scenario_exits_1_with_expected_and_actual(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(
        """
- name: the bot hands over
  conversation:
    state: bot
    participants: [{role: bot, id: demo, mode: direct, primary: true}]
  steps:
    - at: 0s
      event: bot.handoff
      data: {bot: demo}
      expect:
        rules: [bot-failed]
        state: agent
        sent: ["*chatting with*"]
- name: a new conversation gets the bot
  steps:
    - event: conversation.created
      expect: {state: bot}
""",
        encoding="utf-8",
    )
    code = main(["rules", "test", str(scenario), "--rules", str(RULES_DIR)])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL the bot hands over" in out
    assert "PASS a new conversation gets the bot" in out
    assert f"{scenario}:7: step 1" in out
    assert "rules: expected ['bot-failed'], got ['bot-hands-over']" in out
    assert "state: expected 'agent', got 'queued'" in out
    assert "sent: expected ['*chatting with*'], got ['You are in the queue." in out
    assert "bot.handoff -> bot-hands-over" in out
    assert "1 passed, 1 failed" in out


def test_an_invalid_scenario_file_exits_2_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "invalid.yaml"
    scenario.write_text(
        """
- name: typos
  steps:
    - at: 5 minutes
      event: customer.mesage
      expect: {stat: bot}
- name: time goes back
  steps:
    - at: 5m
    - at: 1m
""",
        encoding="utf-8",
    )
    code = main(["rules", "test", str(scenario), "--rules", str(RULES_DIR)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{scenario}:4:11: scenario 'typos': steps.0.at: " in err
    assert "unknown event type 'customer.mesage'; did you mean 'customer.message'?" in err
    assert f"{scenario}:6:" in err and "unknown key 'stat'; did you mean 'state'?" in err
    assert "scenario 'time goes back'" in err and "goes back in time" in err
    with pytest.raises(ScenarioError):
        load_scenarios(scenario)


def test_a_broken_yaml_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "broken.yaml"
    scenario.write_text("- name: x\n  steps: [\n", encoding="utf-8")
    assert main(["rules", "test", str(scenario), "--rules", str(RULES_DIR)]) == 2
    assert "YAML syntax error" in capsys.readouterr().err


def test_a_30_minute_timer_runs_on_the_simulated_clock(tmp_path: Path) -> None:
    scenario = tmp_path / "slow.yaml"
    scenario.write_text(
        """
name: half an hour of silence
settings: {idle_reminder: 30m, idle_close: 30m}
conversation:
  state: bot
  participants: [{role: bot, id: demo, mode: direct, primary: true}]
steps:
  - event: bot.message
    data: {bot: demo, text: "Hello!"}
  - at: 29m59s
    expect: {fired: [], timers: [idle_reminder]}
  - at: 30m
    expect: {fired: [{timer: idle_reminder, rules: [idle-reminder]}], timers: [idle_close]}
  - at: 1h
    expect:
      fired: [idle_close]
      state: closed
      sent: ["We closed this conversation*"]
""",
        encoding="utf-8",
    )
    report = run_scenarios(load_scenarios(scenario), RULES_DIR, _settings())
    assert report.passed, "\n".join(report.lines())


def test_convctl_rules_test_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVCTL_")}
    env["CONVCTL_DATA_DIR"] = str(tmp_path / "data")
    env["CONVCTL_RULES_DIR"] = str(RULES_DIR)
    result = subprocess.run(
        [CONVCTL, "rules", "test", "--matcher", "durable"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("PASS ") for line in lines)
    assert not any(line.startswith("FAIL ") for line in lines)
    assert "0 failed (matcher durable)" in result.stdout
    assert "rules that fired in no scenario" not in result.stdout
