"""What tests that run an LVMActor share: an actor whose health check passes.

Imported by ``tests/test_amqp_broker.py``, ``tests/test_amqp_contract.py`` and
``tests/test_timed.py``; not a test module itself.
"""

from __future__ import annotations

from lvmopstools.actor import ErrorCodesBase, LVMActor

__all__ = ["QuietActor"]


class QuietActor(LVMActor):
    """An LVMActor whose health check always passes."""

    async def _check_internal(self) -> None:
        return None

    async def _troubleshoot_internal(
        self, error_code: ErrorCodesBase, exception: Exception | None = None
    ) -> bool:
        return True
