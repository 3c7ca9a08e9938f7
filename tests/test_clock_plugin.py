"""Tests of the "virtual clock" section of lvmopstools.pytest_plugin, via pytester."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# Rival plugins stay out; the toolkit's plugin and pytest-asyncio are loaded.
ARGS = (
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
    "-p",
    "no:faker",
    "-p",
    "no:benchmark",
    "-p",
    "lvmopstools",
    "-p",
    "asyncio",
    "-o",
    "asyncio_default_fixture_loop_scope=function",
)

TESTS = """
import asyncio
import datetime
import time

import pytest
import pytest_asyncio

from lvmopstools.testing import _clock_patch
from lvmopstools.testing.clock import current_clock

START = datetime.datetime(2001, 2, 3, tzinfo=datetime.UTC)
seen = {}


@pytest_asyncio.fixture
async def warmed_up():
    # Set up after the clock when the test is marked: runs in virtual time.
    await asyncio.sleep(100)
    clock = current_clock()
    seen["fixture"] = None if clock is None else clock.time()
    yield


MARK_ASYNCIO
@pytest.mark.virtual_clock(start=START, quiet_period=0)
async def test_marked(warmed_up):
    clock = current_clock()
    assert clock is not None
    assert seen["fixture"] == 100
    await asyncio.sleep(3600)
    assert clock.time() == 3700
    assert time.time() == START.timestamp() + 3700
    assert clock.quiet_period == 0


MARK_ASYNCIO
async def test_fixture(virtual_clock):
    assert current_clock() is virtual_clock
    await asyncio.wait_for(asyncio.sleep(299), 300)
    assert virtual_clock.time() == 299


MARK_ASYNCIO
async def test_unmarked_loop_is_untouched():
    loop = asyncio.get_running_loop()
    assert current_clock() is None
    assert "time" not in vars(loop)
    assert time.time is _clock_patch.real_time


MARK_ASYNCIO
@pytest.mark.virtual_clock()
async def test_marked_failing():
    await asyncio.sleep(10)
    raise AssertionError("failing on purpose")


def test_restored_after_the_failure():
    assert time.time is _clock_patch.real_time
    assert datetime.datetime.now().year > 2001
"""


def _write_tests(pytester: pytest.Pytester, *, strict: bool) -> None:
    mark = "@pytest.mark.asyncio" if strict else ""
    pytester.makepyfile(test_virtual=TESTS.replace("MARK_ASYNCIO", mark))


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_marker_and_fixture(pytester: pytest.Pytester, mode: str) -> None:
    _write_tests(pytester, strict=mode == "strict")

    result = pytester.runpytest(*ARGS, "-o", f"asyncio_mode={mode}", "-q")

    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*test_marked_failing*failing on purpose*"])


def test_marker_positional_arguments_are_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.virtual_clock(5)
        async def test_bad():
            pass
        """
    )

    result = pytester.runpytest(*ARGS, "-o", "asyncio_mode=strict")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes keyword arguments only*got positional (5,)*"])


def test_marker_bad_keyword_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        @pytest.mark.virtual_clock(quiet_period=-1)
        async def test_bad():
            pass
        """
    )

    result = pytester.runpytest(*ARGS, "-o", "asyncio_mode=strict")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*quiet_period must be a finite number*got -1*"])


def test_a_regular_test_function_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        import pytest

        @pytest.mark.virtual_clock()
        def test_sync():
            time.sleep(0.01)
        """
    )

    result = pytester.runpytest(*ARGS, "-o", "asyncio_mode=strict")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_sync uses the virtual clock but is a regular*"])


def test_a_wider_loop_scope_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio

        import pytest

        @pytest.mark.asyncio(loop_scope="module")
        async def test_module_loop(virtual_clock):
            await asyncio.sleep(0.01)
        """
    )

    result = pytester.runpytest(*ARGS, "-o", "asyncio_mode=strict")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*runs on a 'module'-scoped event loop*"])


def test_unmarked_tests_never_import_the_clock(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio
        import sys

        import pytest

        @pytest.mark.asyncio
        async def test_plain():
            await asyncio.sleep(0)

        def test_clock_not_imported():
            assert "lvmopstools.testing.clock" not in sys.modules
        """
    )

    # In a subprocess: this process imported the clock already.
    result = pytester.runpytest_subprocess(*ARGS, "-o", "asyncio_mode=strict")

    result.assert_outcomes(passed=2)
