"""What the AMQP tests share: draining a queue and reading why something closed.

Imported by ``tests/test_amqp_broker.py`` and ``tests/test_amqp_contract.py``;
not a test module itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.abc import AbstractQueue

__all__ = ["WAIT", "closed_with", "drain"]

WAIT = 10.0  # Upper bound, in loop seconds, on any single wait of a test.


async def drain(queue: AbstractQueue) -> list[bytes]:
    """Return the bodies of every ready message, acknowledging them."""
    bodies = []
    async with asyncio.timeout(WAIT):
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
    return bodies


async def closed_with(closing: asyncio.Future[Any]) -> BaseException:
    """Wait for an aiormq ``closing`` future and return why it closed."""
    async with asyncio.timeout(WAIT):
        try:
            await closing
        except BaseException as err:
            return err
    pytest.fail("the channel or connection closed without an error")
