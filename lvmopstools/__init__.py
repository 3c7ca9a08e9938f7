"""Operations library for LVM actors, and the toolkit that tests them.

The library half is :mod:`lvmopstools.actor`, :mod:`lvmopstools.retrier` and
:mod:`lvmopstools.socket`. The fault-injection toolkit lives in
:mod:`lvmopstools.testing`, and :mod:`lvmopstools.pytest_plugin` wires it into
pytest (``pytest -p lvmopstools``).

Importing this package imports nothing heavy: each module is imported when it
is first used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("lvmopstools")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"
