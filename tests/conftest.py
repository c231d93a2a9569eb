"""Loads every fixture module in tests/support as a pytest plugin."""
import pkgutil

import pytest

# fixture modules import each other: rewrite their asserts whichever is imported first
pytest.register_assert_rewrite("tests.support")

import tests.support as _support  # noqa: E402

pytest_plugins = [f"tests.support.{m.name}" for m in pkgutil.iter_modules(_support.__path__)]
