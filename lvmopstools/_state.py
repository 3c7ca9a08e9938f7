"""Actor states, error codes and check errors: the data half of lvmopstools.actor.

Everything here is re-exported by :mod:`lvmopstools.actor`, which is where users
import it from; it lives apart so that each module stays readable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = [
    "STATE_SCHEMA",
    "ActorState",
    "CheckError",
    "ErrorCodes",
    "ErrorCodesBase",
    "ErrorData",
    "create_error_codes",
    "exception_data",
]

#: JSON schema of the ``state`` keyword, added to every LVMActor's model.
STATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "integer"},
        "flags": {"type": "array", "items": {"type": "string"}},
        "error": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {
                        "code": {"type": "integer"},
                        "critical": {"type": "boolean"},
                        "description": {"type": ["string", "null"]},
                        "exception": {"type": ["object", "null"]},
                    },
                    "required": ["code", "critical", "description"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "required": ["code", "flags", "error"],
    "additionalProperties": False,
}


class ActorState(enum.Flag):
    """Defines the possible states of the actor.

    The single flags are ``RUNNING`` (connected to the broker), ``READY`` (the
    last check passed), ``TROUBLESHOOTING``, ``TROUBLESHOOT_FAILED``,
    ``RESTARTING`` and ``CHECKING``. ``NOT_READY`` groups the flags that mean the
    actor is not ready; ``SKIP_CHECK`` groups those during which the check loop
    does not start a new check.
    """

    RUNNING = 1
    READY = 2
    TROUBLESHOOTING = 4
    TROUBLESHOOT_FAILED = 8
    RESTARTING = 16
    CHECKING = 32

    NOT_READY = TROUBLESHOOTING | TROUBLESHOOT_FAILED | RESTARTING
    SKIP_CHECK = CHECKING | TROUBLESHOOTING | RESTARTING

    def get_state_names(self) -> list[str]:
        """Returns the state names that are set.

        Returns
        -------
        names
            The names of the single flags set in this state, in flag order;
            composite names such as ``NOT_READY`` are not listed.
        """
        return [flag.name for flag in type(self) if flag in self and flag.name]


@dataclass
class ErrorData:
    """What an error code means.

    Parameters
    ----------
    code
        The numeric error code, unique within an enumeration.
    critical
        Whether the error is critical.
    description
        A human-readable description.
    """

    code: int
    critical: bool = False
    description: str = ""


class ErrorCodesBase(enum.Enum):
    """Enumeration of error codes.

    Members are :class:`ErrorData` values; build an enumeration with
    :func:`create_error_codes`.
    """

    @classmethod
    def get_error_code(cls, error_code: int) -> ErrorCodesBase:
        """Returns the ErrorCodes member that matches the ``error_code`` value.

        Parameters
        ----------
        error_code
            The numeric code to look up.

        Returns
        -------
        member
            The member whose :class:`ErrorData` has that code.

        Raises
        ------
        ValueError
            If no member has that code.
        """
        for member in cls:
            if member.value.code == error_code:
                return member

        known = sorted(member.value.code for member in cls)
        msg = (
            f"error code {error_code!r} is not in {cls.__name__}; known codes: {known}"
        )
        raise ValueError(msg)


def _error_data(name: str, data: tuple[Any, ...] | list[Any] | ErrorData) -> ErrorData:
    if isinstance(data, ErrorData):
        return data

    if isinstance(data, tuple | list) and 1 <= len(data) <= 3:
        return ErrorData(*data)

    msg = (
        f"error code {name!r} must be an ErrorData or a tuple or list of "
        f"(code, critical, description), got {data!r}"
    )
    raise TypeError(msg)


def create_error_codes(
    error_codes: dict[str, tuple[Any, ...] | list[Any] | ErrorData],
    name: str = "ErrorCodes",
    include_unknown: bool = True,
) -> Any:
    """Creates an enumeration of error codes.

    Parameters
    ----------
    error_codes
        Maps each error name to its :class:`ErrorData`, or to a tuple or list of
        its fields ``(code, critical, description)``. Names are upper-cased.
    name
        The name of the enumeration class.
    include_unknown
        Add ``UNKNOWN = ErrorData(9999, True, "Unknown error")`` unless the
        mapping already has an ``UNKNOWN`` entry.

    Returns
    -------
    enumeration
        A subclass of :class:`ErrorCodesBase`.

    Raises
    ------
    TypeError
        If an entry is neither an ErrorData nor a tuple or list of its fields.
    ValueError
        If two names differ only in case, or two entries share a numeric code.
    """
    members: dict[str, ErrorData] = {}
    for error_name, data in error_codes.items():
        upper = error_name.upper()
        if upper in members:
            msg = f"error name {error_name!r} is given twice (names are upper-cased)"
            raise ValueError(msg)
        members[upper] = _error_data(error_name, data)

    if include_unknown and "UNKNOWN" not in members:
        members["UNKNOWN"] = ErrorData(9999, True, "Unknown error")

    seen: dict[int, str] = {}
    for member_name, data in members.items():
        if data.code in seen:
            msg = (
                f"error code {data.code!r} is used by both {seen[data.code]!r} "
                f"and {member_name!r}; give each error its own code"
            )
            raise ValueError(msg)
        seen[data.code] = member_name

    # mypy does not model Enum's functional API on a subclass.
    return ErrorCodesBase(name, members)  # type: ignore[call-arg]


ErrorCodes = create_error_codes({"UNKNOWN": ErrorData(9999, True, "Unknown error")})


class CheckError(Exception):
    """An exception raised when the LVMActor check fails.

    Parameters
    ----------
    message
        What went wrong.
    error_code
        The error, as a member of an error-code enumeration or as a numeric code
        of :data:`ErrorCodes`.
    """

    def __init__(
        self,
        message: str = "",
        error_code: ErrorCodesBase | int = ErrorCodes.UNKNOWN,
    ) -> None:
        super().__init__(message)

        self.message = message
        if isinstance(error_code, int):
            self.error_code: ErrorCodesBase = ErrorCodes.get_error_code(error_code)
        else:
            self.error_code = error_code


def exception_data(
    exception: BaseException | None, traceback_frame: int = 0
) -> dict[str, Any] | None:
    """Describe an exception for the ``error`` field of the ``state`` keyword.

    Parameters
    ----------
    exception
        The exception, or None.
    traceback_frame
        Which frame of its traceback to report, counting from the outermost (0).

    Returns
    -------
    data
        Module, type, message, file name and line number, or None.
    """
    if exception is None:
        return None

    filename: str | None = None
    lineno: int | None = None
    tb = exception.__traceback__
    for _ in range(traceback_frame):
        if tb is None or tb.tb_next is None:
            break
        tb = tb.tb_next
    if tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        lineno = tb.tb_lineno

    return {
        "module": type(exception).__module__,
        "type": type(exception).__name__,
        "message": str(exception),
        "filename": filename,
        "lineno": lineno,
    }
