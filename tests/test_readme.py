"""The README's example test runs, through pytester, as a user would run it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    text = README.read_text()
    blocks = [part.split("```")[0] for part in text.split("```python\n")[1:]]
    assert len(blocks) == 1, "the README should hold one python example"
    pytester.makepyfile(test_readme_example=blocks[0])

    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-p",
        "lvmopstools",
        "-o",
        "asyncio_mode=strict",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )

    result.assert_outcomes(passed=1)
