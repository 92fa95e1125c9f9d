"""Fixtures: pools of 2 and 4 gloo ranks, started once per test session (see ``workers.py``)."""

import pytest

from .workers import Ranks


@pytest.fixture(scope="session")
def ranks2():
    pool = Ranks(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def ranks4():
    pool = Ranks(4)
    yield pool
    pool.close()
