"""Process-wide replacement of the time and datetime functions (private).

:mod:`lvmopstools.testing.clock` uses this module to make ``time.time()``,
``time.monotonic()``, ``time.sleep()``, ``datetime.datetime.now()`` and their
relatives read the virtual clock of the event loop running in the calling
thread. The replacements are installed when the first clock starts and removed
when the last one stops. Each replacement looks up the running loop of the
calling thread: with no clock on it (another thread, another loop, no loop at
all) it calls the real function, so code that is not under a clock keeps the
real time.

Besides the attributes of :mod:`time` and :mod:`datetime`, modules that copied
one of these objects into their own namespace before the clock started (``from
datetime import datetime``, as clu does, or ``from time import time``) get the
replacement too. The scan of ``sys.modules`` that finds them is cached: each
module is read once per process, so only the first clock pays for it.

It does not replace ``time.process_time``, ``time.thread_time``, the C-level
clocks used by extension modules, or ``datetime.datetime.fromtimestamp`` (which
converts the timestamp it is given and needs no change).
"""

from __future__ import annotations

import asyncio

# Imported here, before any clock runs, so that they copy the real clock
# functions: the first run_in_executor under a clock would import them, and
# queue.Queue.get(timeout=...) with a virtual monotonic would never time out.
import concurrent.futures.thread  # noqa: F401
import copyreg
import datetime as _datetime_module
import math
import queue  # noqa: F401
import sys
import threading
import time as _time_module
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

__all__ = ["WallSource", "install", "uninstall"]

_get_running_loop = asyncio.events._get_running_loop

real_time = _time_module.time
real_time_ns = _time_module.time_ns
real_monotonic = _time_module.monotonic
real_monotonic_ns = _time_module.monotonic_ns
real_perf_counter = _time_module.perf_counter
real_perf_counter_ns = _time_module.perf_counter_ns
real_sleep = _time_module.sleep
real_datetime = _datetime_module.datetime
real_date = _datetime_module.date

# The clock's own modules, which hold the replacements themselves.
_OWN_PREFIXES = ("lvmopstools.testing._clock", "lvmopstools.testing.clock")

# Modules whose captured references are never replaced. They wait in real time
# with timeouts computed from a captured clock (``from time import monotonic``):
# with a frozen virtual clock those waits would never expire.
_NEVER_PATCHED_PREFIXES = (
    "threading",
    "queue",
    "subprocess",
    "selectors",
    "concurrent",
    "asyncio",
    "multiprocessing",
    "socket",
    "ssl",
    "_pytest",
    "pytest",
    "pluggy",
    "importlib",
    "datetime",
    "time",
    "_strptime",
)


class WallSource(Protocol):
    """What a clock offers to the replacements (one per event loop)."""

    def wall_time(self) -> float:
        """Return virtual seconds since the epoch."""
        ...

    def loop_time(self) -> float:
        """Return the virtual value of ``time.monotonic()``."""
        ...

    def perf_time(self) -> float:
        """Return the virtual value of ``time.perf_counter()``."""
        ...

    def sleep_virtually(self, seconds: float) -> None:
        """Move virtual time forward by ``seconds`` without blocking."""
        ...


# The clock of each event loop; read without a lock (a dict lookup is atomic).
_clocks: dict[AbstractEventLoop, WallSource] = {}
_lock = threading.Lock()


def _source() -> WallSource | None:
    """Return the clock of the loop running in this thread, if any."""
    if not _clocks:
        return None
    return _clocks.get(_get_running_loop())  # type: ignore[arg-type]


def _time() -> float:
    source = _source()
    return real_time() if source is None else source.wall_time()


def _time_ns() -> int:
    source = _source()
    if source is None:
        return real_time_ns()
    return round(source.wall_time() * 1e9)


def _monotonic() -> float:
    source = _source()
    return real_monotonic() if source is None else source.loop_time()


def _monotonic_ns() -> int:
    source = _source()
    if source is None:
        return real_monotonic_ns()
    return round(source.loop_time() * 1e9)


def _perf_counter() -> float:
    source = _source()
    return real_perf_counter() if source is None else source.perf_time()


def _perf_counter_ns() -> int:
    source = _source()
    if source is None:
        return real_perf_counter_ns()
    return round(source.perf_time() * 1e9)


def _sleep(seconds: float) -> None:
    source = _source()
    if source is None:
        real_sleep(seconds)
        return

    check_sleep_length(seconds)
    source.sleep_virtually(float(seconds))


def check_sleep_length(seconds: float) -> None:
    """Refuse what the real ``time.sleep`` refuses, with its exceptions.

    Raises
    ------
    ValueError
        For a negative length or NaN.
    OverflowError
        For an infinite length.
    """
    if math.isnan(seconds):
        msg = "Invalid value NaN (not a number)"
        raise ValueError(msg)
    if seconds < 0:
        msg = "sleep length must be non-negative"
        raise ValueError(msg)
    if math.isinf(seconds):
        msg = "timestamp out of range for platform time_t"
        raise OverflowError(msg)


class _DateMeta(type):
    """Make ``isinstance`` accept real dates for the two replacement classes.

    Only :class:`VirtualDate` and :class:`VirtualDatetime` themselves are
    lenient; a class that subclasses them (code defining ``class
    Stamp(datetime.datetime)`` while a clock runs) checks as usual.
    """

    def __instancecheck__(cls, obj: object) -> bool:
        if cls in _LENIENT:
            return isinstance(obj, cls.__mro__[1])
        return type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        if cls in _LENIENT:
            return issubclass(sub, cls.__mro__[1])
        return type.__subclasscheck__(cls, sub)


class VirtualDate(real_date, metaclass=_DateMeta):
    """``datetime.date`` whose ``today()`` reads the virtual clock.

    Calling the class, and its class methods, make real :class:`datetime.date`
    objects, so no instance of this class is ever made and nothing outlives
    the clock with a replaced type. It carries the real class's name and
    module, so that pickles made under a clock are the usual ones.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is VirtualDate:
            return real_date(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    @classmethod
    def today(cls) -> _datetime_module.date:  # type: ignore[override]
        """Return the current local date (virtual under a clock)."""
        return real_date.fromtimestamp(_time())


class VirtualDatetime(real_datetime, metaclass=_DateMeta):
    """``datetime.datetime`` whose ``now()``, ``utcnow()`` and ``today()``
    read the virtual clock.

    Calling the class, and its class methods, make real
    :class:`datetime.datetime` objects, as for :class:`VirtualDate`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is VirtualDatetime:
            return real_datetime(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    @classmethod
    def now(  # type: ignore[override]
        cls, tz: _datetime_module.tzinfo | None = None
    ) -> _datetime_module.datetime:
        """Return the current time (virtual under a clock), as the real one."""
        return real_datetime.fromtimestamp(_time(), tz)

    @classmethod
    def utcnow(cls) -> _datetime_module.datetime:  # type: ignore[override]
        """Return the current naive UTC time (virtual under a clock)."""
        return real_datetime.fromtimestamp(_time(), _datetime_module.UTC).replace(
            tzinfo=None
        )

    @classmethod
    def today(cls) -> _datetime_module.datetime:  # type: ignore[override]
        """Return the current local time (virtual under a clock)."""
        return real_datetime.fromtimestamp(_time())


_LENIENT = (VirtualDate, VirtualDatetime)
for _fake, _real in ((VirtualDate, real_date), (VirtualDatetime, real_datetime)):
    _fake.__module__ = _real.__module__
    _fake.__name__ = _real.__name__
    _fake.__qualname__ = _real.__qualname__


def _reduce_as(fake: type) -> Callable[[Any], Any]:
    """Return a pickle reducer that names ``fake`` instead of the real class.

    While the classes are replaced, ``pickle`` finds the replacement under the
    name ``datetime.datetime`` and refuses to save the real class by that
    name. Naming the replacement, which carries the same name, writes the
    usual pickle, which loads as a real datetime anywhere.
    """

    def reduce(value: Any) -> Any:
        _, arguments = value.__reduce__()
        return fake, arguments

    return reduce


_PICKLE_REDUCERS = {
    real_date: _reduce_as(VirtualDate),
    real_datetime: _reduce_as(VirtualDatetime),
}


# Real object -> replacement, for the module attributes and for the scan.
_REPLACEMENTS: dict[int, tuple[object, object]] = {
    id(real): (real, fake)
    for real, fake in (
        (real_time, _time),
        (real_time_ns, _time_ns),
        (real_monotonic, _monotonic),
        (real_monotonic_ns, _monotonic_ns),
        (real_perf_counter, _perf_counter),
        (real_perf_counter_ns, _perf_counter_ns),
        (real_sleep, _sleep),
        (real_datetime, VirtualDatetime),
        (real_date, VirtualDate),
    )
}
_FAKE_IDS = {id(fake) for _, fake in _REPLACEMENTS.values()}

_MODULE_ATTRIBUTES: tuple[tuple[ModuleType, str], ...] = (
    (_time_module, "time"),
    (_time_module, "time_ns"),
    (_time_module, "monotonic"),
    (_time_module, "monotonic_ns"),
    (_time_module, "perf_counter"),
    (_time_module, "perf_counter_ns"),
    (_time_module, "sleep"),
    (_datetime_module, "datetime"),
    (_datetime_module, "date"),
)

# The scan cache: names of the modules already read, and where they hold a
# real object that has a replacement (module, attribute name).
_scanned: set[str] = set()
_captured: list[tuple[ModuleType, str]] = []
# Attributes of never-patched modules that hold a replacement, to put back.
_restore_only: list[tuple[ModuleType, str]] = []


def _scan_new_modules() -> None:
    """Record the captured references of the modules not read yet."""
    for name, module in list(sys.modules.items()):
        if name in _scanned:
            continue
        _scanned.add(name)
        if name.startswith(_OWN_PREFIXES):
            continue
        try:
            namespace = vars(module)
        except TypeError:
            continue

        if name.startswith(_NEVER_PATCHED_PREFIXES):
            # Never made fake, but one imported while a clock ran may have
            # copied a replacement: that copy is put back on uninstall.
            _restore_only.extend(
                (module, attribute)
                for attribute, value in list(namespace.items())
                if id(value) in _FAKE_IDS
            )
            continue

        for attribute, value in list(namespace.items()):
            if id(value) in _REPLACEMENTS or id(value) in _FAKE_IDS:
                _captured.append((module, attribute))


def _swap(to_fake: bool) -> None:
    """Point every known reference at the replacements or back at the reals."""
    for cls, reducer in _PICKLE_REDUCERS.items():
        if to_fake:
            copyreg.pickle(cls, reducer)
        else:
            copyreg.dispatch_table.pop(cls, None)

    places = (*_MODULE_ATTRIBUTES, *_captured)
    if not to_fake:
        places += tuple(_restore_only)
        _restore_only.clear()
    for module, attribute in places:
        value = getattr(module, attribute, None)
        for real, fake in _REPLACEMENTS.values():
            current, new = (real, fake) if to_fake else (fake, real)
            if value is current:
                setattr(module, attribute, new)
                break


def install(loop: AbstractEventLoop, source: WallSource) -> None:
    """Route the time functions of ``loop``'s thread to ``source``."""
    with _lock:
        first = not _clocks
        _clocks[loop] = source
        if not first:
            return

        try:
            _scan_new_modules()
            _swap(to_fake=True)
        except BaseException:
            # Leave nothing half-replaced: put back what was swapped already.
            del _clocks[loop]
            _swap(to_fake=False)
            raise


def uninstall(loop: AbstractEventLoop) -> None:
    """Stop routing for ``loop``; restore the real functions after the last."""
    with _lock:
        _clocks.pop(loop, None)
        if not _clocks:
            # Modules imported while a clock ran may have copied a replacement.
            _scan_new_modules()
            _swap(to_fake=False)


def patched_objects() -> list[tuple[ModuleType, str, Any]]:
    """Return the module attributes this module manages and their real values.

    Used by the tests to check that everything is restored.
    """
    result: list[tuple[ModuleType, str, Any]] = []
    for module, attribute in _MODULE_ATTRIBUTES:
        result.append((module, attribute, _real_value(module, attribute)))
    return result


def _real_value(module: ModuleType, attribute: str) -> Any:
    reals: dict[str, Callable[..., Any] | type] = {
        "time": real_time,
        "time_ns": real_time_ns,
        "monotonic": real_monotonic,
        "monotonic_ns": real_monotonic_ns,
        "perf_counter": real_perf_counter,
        "perf_counter_ns": real_perf_counter_ns,
        "sleep": real_sleep,
        "datetime": real_datetime,
        "date": real_date,
    }
    return reals[attribute]
