"""The per-layer rule registry refuses a second rule for a layer type unless asked to replace it."""

from __future__ import annotations

import pytest
import torch.nn as nn

from gradconflict.engine import rules


def _rule(*args, **kwargs):  # a stand-in: the registry stores it, nothing calls it here
    raise AssertionError("not called")


def test_a_second_rule_for_a_known_layer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    before = rules.RULES[nn.Linear]
    with pytest.raises(ValueError, match=r"Linear .*already has a per-task gradient rule; pass replace=True"):
        rules.register_rule(nn.Linear)(_rule)
    assert rules.RULES[nn.Linear] is before


def test_replace_and_new_types_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))

    class Mine(nn.Module):
        def forward(self, x):
            return x

    class Sub(Mine):  # same forward: the parent's rule applies
        pass

    rules.register_rule(Mine)(_rule)
    assert rules.rule_for(Mine()) is _rule and rules.rule_for(Sub()) is _rule
    rules.register_rule(nn.Linear, replace=True)(_rule)
    assert rules.rule_for(nn.Linear(2, 2)) is _rule


def test_a_model_file_that_registers_a_rule_loads_twice(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A user's model file is imported again at every load (track loads one model per checkpoint): the same rule,
    registered again by the same file, is no conflict; another rule for that layer still is."""
    from gradconflict.spec import load_model

    monkeypatch.setattr(rules, "RULES", dict(rules.RULES))
    (tmp_path / "m.py").write_text(
        "import torch.nn as nn\n"
        "from gradconflict.engine.rules import register_rule\n\n"
        "class Gate(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x\n\n"
        "@register_rule(nn.SiLU)\n"
        "def silu_rule(*args, **kwargs):\n"
        "    raise NotImplementedError\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 1, 1), nn.SiLU())\n")
    spec = f"{tmp_path / 'm.py'}:build"
    load_model(spec)
    load_model(spec)
    assert rules.RULES[nn.SiLU].__qualname__ == "silu_rule"
    with pytest.raises(ValueError, match="SiLU .*already has a per-task gradient rule"):
        rules.register_rule(nn.SiLU)(_rule)
