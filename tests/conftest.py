"""Shared pytest fixtures.

* ``report_figure``: tests record measured figures (e.g. parity errors); they are printed in a
  "measured figures" section at the end of the run.
* ``sam2_oracle``: the official-SAM2 oracle helpers (``tests/sam2_oracle.py``), with the
  official sdist fetched; a failed download fails the test with the reason.
"""
from __future__ import annotations

from typing import Callable, List

import pytest

_FIGURES: List[str] = []


@pytest.fixture(scope="session")
def report_figure() -> Callable[[str], None]:
    """Callable taking one line of text to print in the end-of-run summary."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("measured figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def sam2_oracle():
    """The ``sam2_oracle`` module, after making sure the official sdist is unpacked in its
    cache (``<repo>/.cache/sam2-oracle`` or ``$MDSAM_ORACLE_CACHE``)."""
    import sam2_oracle

    try:
        sam2_oracle.fetch_sdist()
        problem = None
    except sam2_oracle.OracleError as error:
        problem = str(error)
    if problem:  # failed outside the except block: the reason is shown once
        pytest.fail(problem, pytrace=False)
    return sam2_oracle
