"""asyncio helpers shared by the control-plane client and the engine's servers."""
from __future__ import annotations

import asyncio


async def wait_within(aw, timeout: float):
    """`await aw` (a coroutine or future), raising asyncio.TimeoutError after `timeout` seconds, when
    aw is cancelled. Unlike asyncio.wait_for before Python 3.12 (CPython gh-86296), a cancellation of
    the caller that lands as aw completes is never swallowed. wait_for returned aw's result instead:
    a loop cancelled in that window ran on, and whoever awaited its end waited forever (the API
    server hung at shutdown when its core heartbeat got a reply just as it was cancelled)."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if not done:
        fut.cancel()
        await asyncio.gather(fut, return_exceptions=True)  # its cancellation has landed on return
        raise asyncio.TimeoutError
    return fut.result()
