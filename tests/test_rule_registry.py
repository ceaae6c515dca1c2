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
