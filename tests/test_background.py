"""Stopping background tasks for sure (gatehouse.background): a task that loses a cancel still stops.

The mirror runner's test is the one that hung CI (tests/test_mirrors_broker.py): a mirror's task cancelled while
it closed its NATS connection, inside ``asyncio.wait_for``, went on stepping. Here the lost cancel is made on
purpose, so each test fails the same way every time without the fix.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

from gatehouse.background import stop_tasks
from gatehouse.events.mirror_runner import MirrorRunner
from gatehouse.events.mirrors import Step
from gatehouse.events.outbox import Position


async def _loses_one_cancel(steps: list[int]) -> None:
    """A loop that survives one cancel, as a loop does whose close ran inside 3.11's ``wait_for`` at the wrong
    moment."""
    lost = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if lost:
                raise
            lost = True
        steps.append(1)


async def test_a_task_that_loses_a_cancel_runs_on_after_one_cancel_and_stops_with_stop_tasks() -> None:
    steps: list[int] = []
    task = asyncio.create_task(_loses_one_cancel(steps))
    await asyncio.sleep(0.03)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.2)
    assert not done, "one cancel should not have ended it (else this test proves nothing)"
    ran = len(steps)
    async with asyncio.timeout(5):
        await stop_tasks([task], again_s=0.05)
    assert task.cancelled()
    await asyncio.sleep(0.05)
    assert len(steps) == ran or len(steps) == ran + 1  # (at most the step in hand), and nothing after


async def test_the_errors_of_stopped_tasks_are_taken_not_raised() -> None:
    async def fails() -> None:
        raise ValueError("gone")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    failed, sleeping = asyncio.create_task(fails()), asyncio.create_task(sleeps())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        await stop_tasks([failed, sleeping])
        assert failed.done() and not failed.cancelled() and sleeping.cancelled()
        del failed
        gc.collect()
        assert reported == []  # ("Task exception was never retrieved" goes to the loop's handler)
    finally:
        loop.set_exception_handler(None)


async def test_stop_tasks_of_nothing_or_of_finished_tasks_returns_at_once() -> None:
    async def nothing() -> None:
        return None

    finished = asyncio.create_task(nothing())
    await finished
    async with asyncio.timeout(1):
        await stop_tasks([])
        await stop_tasks([finished])


@dataclass
class _Plan:
    name: str = "m"
    poll_s: float = 0.005
    batch: int = 10


class _SyncThatLosesACancel:
    """A mirror's sync (our own interface) whose step fails, and whose close, called after each failure,
    swallows one cancel as nats-py's close inside 3.11's wait_for did."""

    def __init__(self) -> None:
        self.plan = _Plan()
        self.steps = 0
        self.lost = False
        self.closing = asyncio.Event()

    async def step(self) -> Step:
        self.steps += 1
        raise OSError("no stream yet")

    async def waiting(self, position: Position) -> int:
        return 0

    async def close(self) -> None:
        self.closing.set()
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            if self.lost:
                raise
            self.lost = True


async def test_the_mirror_runner_stops_though_a_close_loses_its_cancel() -> None:
    sync = _SyncThatLosesACancel()
    runner = MirrorRunner([sync])
    await runner.start()
    async with asyncio.timeout(10):
        await sync.closing.wait()  # the cancel lands inside close()
    async with asyncio.timeout(10):
        await runner.stop()
    assert sync.lost
    steps = sync.steps
    await asyncio.sleep(0.05)
    assert sync.steps == steps
