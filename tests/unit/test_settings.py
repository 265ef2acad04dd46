"""The per-run limits a workflow gets: its own LIMITS where it asked, else the operator's defaults, never over the caps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowpool.settings import WORKFLOW_LIMITS, Settings


def test_a_workflow_without_limits_gets_the_defaults() -> None:
    settings = Settings(sandbox_memory_mb=300, sandbox_tmp_mb=10, max_chunks=7)
    limits = settings.run_limits(None)
    assert set(limits) == set(WORKFLOW_LIMITS)
    assert limits["memory_mb"] == 300
    assert limits["tmp_mb"] == 10
    assert limits["chunks"] == 7
    assert limits["cpu_seconds"] is None  # as long as the hard time limit


def test_a_workflow_may_ask_for_less_or_more_but_never_over_the_cap() -> None:
    settings = Settings(sandbox_memory_mb=512, sandbox_memory_mb_cap=1024, sandbox_tmp_mb_cap=100,
                        max_result_bytes_cap=5000)
    limits = settings.run_limits({"memory_mb": 4096, "tmp_mb": 5, "result_bytes": 10**9, "cpu_seconds": 3})
    assert limits["memory_mb"] == 1024
    assert limits["tmp_mb"] == 5
    assert limits["result_bytes"] == 5000
    assert limits["cpu_seconds"] == 3


@pytest.mark.parametrize("key", sorted(WORKFLOW_LIMITS))
def test_every_limit_names_settings_that_exist(key: str) -> None:
    default, cap = WORKFLOW_LIMITS[key]
    assert default in Settings.model_fields
    assert cap is None or cap in Settings.model_fields


def test_the_readme_documents_every_setting() -> None:
    """Each setting is named in the README's settings table (a cap beside its setting), so none is found only by
    reading the code."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = {name for line in readme.splitlines() if line.startswith("| `FLOWPOOL_")
            for name in re.findall(r"`(FLOWPOOL_[A-Z0-9_]+)`", line)}
    missing = sorted({f"FLOWPOOL_{name.upper()}" for name in Settings.model_fields} - rows)
    assert not missing, f"settings without a README row: {missing}"


def test_doctor_compares_redis_versions_by_number() -> None:
    from flowpool.cli.doctor import _at_least

    assert _at_least("6.2.14", (6, 2)) and _at_least("7.0.15", (6, 2)) and _at_least("10.0", (6, 2))
    assert not _at_least("6.0.16", (6, 2)) and not _at_least("5.0.7", (6, 2)) and not _at_least("", (6, 2))
