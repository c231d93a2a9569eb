"""ctrl_client.aio.wait_within: asyncio.wait_for without the swallowed cancellation of Python < 3.12."""
import asyncio
import sys

import pytest

from ctrl_client.aio import wait_within


async def _cancel_as_it_completes(wait):
    """Cancels a task waiting on a future in the same loop turn as the future completes."""
    fut = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(fut, 10))
    await asyncio.sleep(0)  # the task is now waiting on fut
    fut.set_result(1)
    task.cancel()
    return await task


def test_cancellation_landing_as_the_future_completes_is_not_swallowed():
    if sys.version_info < (3, 12):  # the race is real: wait_for returns the result and eats the cancel
        assert asyncio.run(_cancel_as_it_completes(asyncio.wait_for)) == 1
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_cancel_as_it_completes(wait_within))


def test_result_error_and_timeout():
    async def main():
        assert await wait_within(asyncio.sleep(0, result=7), 1) == 7
        with pytest.raises(ValueError):
            await wait_within(_raise(ValueError("x")), 1)
        never = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await wait_within(never, 0.01)
        assert never.cancelled()
        blocked = asyncio.create_task(asyncio.Event().wait())
        with pytest.raises(asyncio.TimeoutError):
            await wait_within(blocked, 0.01)
        assert blocked.cancelled()  # cancelled and finished by the time the timeout is raised

    async def _raise(e):
        raise e

    asyncio.run(main())
