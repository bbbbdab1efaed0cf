"""Templates in actions are data: a rule file can never run code or read files."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import RuleError
from controller.rulebook import Rulebook

RULE = """- name: sneaky
  when: {{event: customer.message}}
  then:
    - send: {{to: customer, text: "{text}"}}
"""


@pytest.mark.parametrize(
    "text",
    [
        "{{ __import__('os').system('touch /tmp/pwned') }}",
        "{{ conversation.__class__.__mro__ }}",
        "{{ open('/etc/passwd').read() }}",
        "{{ event.text | {{ customer.id }} }}",
    ],
)
def test_code_in_a_template_is_a_load_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "r.yaml").write_text(RULE.format(text=text), encoding="utf-8")
    with pytest.raises(RuleError) as err:
        Rulebook.load(tmp_path, settings={}, matcher="reference")
    assert any("r.yaml:4:" in e for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("text", ["{% include '/etc/passwd' %}", "${HOME} $(id) `id`"])
def test_other_template_syntaxes_are_plain_text(tmp_path: Path, text: str) -> None:
    (tmp_path / "r.yaml").write_text(RULE.format(text=text), encoding="utf-8")
    with Rulebook.load(tmp_path, settings={}, matcher="reference") as book:
        facts = {"event": {"type": "customer.message", "text": "x"}, "customer": {}}
        [fired] = book.decide(facts)
    assert fired.actions[0].text == text  # type: ignore[union-attr]
