from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._support import daemons, stop


@pytest.fixture
def home(micro_home: Path) -> Iterator[Path]:
    """A fresh MICRO_HOME whose daemons are all stopped at the end."""
    yield micro_home
    for pid in daemons(micro_home):
        stop(pid)
