"""The suite's own rules (tests/conftest.py): where mlx is missing (Linux + NVIDIA) its tests skip, saying why, and
nothing else does; tests on the real model are `slow`, so `./run.sh test -m "not slow"` is a quick loop."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests import conftest


def _item(module: str, name: str, params=None, fixtures=(), marks=()):
    added = []
    return SimpleNamespace(module=SimpleNamespace(__name__=f"tests.{module}"), nodeid=f"tests/{module}.py::{name}",
                           callspec=SimpleNamespace(params=params or {}), fixturenames=list(fixtures), added=added,
                           add_marker=added.append, get_closest_marker=lambda m: m if m in marks else None)


def test_without_mlx_only_mlx_tests_skip(monkeypatch):
    monkeypatch.setattr(conftest, "HAS_MLX", False)
    items = [_item("test_mlx_backend", "test_a"), _item("test_methods", "test_b", {"backend": "mlx"}),
             _item("test_losses", "test_c", marks=("mlx",)), _item("test_methods", "test_b", {"backend": "torch"}),
             _item("test_losses", "test_d")]
    conftest.pytest_collection_modifyitems(None, items)
    skipped = [any(m.name == "skip" for m in i.added) for i in items]
    assert skipped == [True, True, True, False, False]
    assert "mlx is not installed" in items[0].added[0].kwargs["reason"]
    monkeypatch.setattr(conftest, "HAS_MLX", True)
    again = [_item("test_mlx_backend", "test_a")]
    conftest.pytest_collection_modifyitems(None, again)
    assert again[0].added == []


def test_real_model_tests_are_slow():
    items = [_item("test_end_to_end", "test_x", fixtures=("offline_model",)), _item("test_plan", "test_y")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [m.name for m in items[0].added] == ["slow"] and items[1].added == []
    assert pytest.mark.slow.name == "slow"
