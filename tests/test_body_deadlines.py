"""Request bodies' deadlines, kept by one timer per port (``http/deadlines.py``): a late body is refused with 408,
a cancellation from elsewhere stays one, and nothing is left behind. (Over the wire, with granian:
``tests/test_server.py::test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline``.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gatehouse.errors import BodyTimeout
from gatehouse.http.deadlines import BodyDeadlines, sweep_interval
from gatehouse.http.exchange import HttpRequest

TIMEOUT_S = 0.2


@pytest.fixture
def deadlines() -> BodyDeadlines:
    return BodyDeadlines(TIMEOUT_S)


def trickled(deadlines: BodyDeadlines | None, gap_s: float, chunks: int = 10) -> HttpRequest:
    """A request whose body comes in ``chunks`` bytes, ``gap_s`` apart, with no declared size."""

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            await asyncio.sleep(gap_s)
            yield b"x"

    return HttpRequest("POST", "/items", "", {}, body_chunks=body, body_deadlines=deadlines)


async def test_a_body_that_arrives_in_time_is_read_whole(deadlines: BodyDeadlines) -> None:
    assert await trickled(deadlines, 0.001).body(100) == b"x" * 10
    assert len(deadlines) == 0


async def test_a_body_past_its_deadline_is_refused_with_408_within_one_sweep(deadlines: BodyDeadlines) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(BodyTimeout) as refused:
        await trickled(deadlines, 0.05, chunks=100).body(1000)  # 5 s of body
    waited = loop.time() - began
    assert TIMEOUT_S <= waited < TIMEOUT_S + sweep_interval(TIMEOUT_S) + 0.1, waited
    assert refused.value.status == 408 and refused.value.headers == {"Connection": "close"}
    assert len(deadlines) == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # (the 408 took its place)


async def test_a_reader_cancelled_from_elsewhere_is_cancelled_not_refused(deadlines: BodyDeadlines) -> None:
    task = asyncio.create_task(trickled(deadlines, 0.05, chunks=100).body(1000))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0


async def test_a_reader_cancelled_from_elsewhere_as_its_deadline_passes_stays_cancelled() -> None:
    """The server stopping in the same moment as the deadline's sweep: the stop wins, as with ``asyncio.timeout``."""

    class StoppingToo(BodyDeadlines):
        reader: asyncio.Task[bytes] | None = None

        def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
            super()._sweep(loop)
            if self.reader is not None and self.reader not in self._readers:  # the sweep cancelled it just now
                self.reader.cancel()

    deadlines = StoppingToo(TIMEOUT_S)
    task = deadlines.reader = asyncio.create_task(trickled(deadlines, 0.05, chunks=100).body(1000))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(deadlines) == 0 and not deadlines._expired


async def test_the_sweeps_stop_when_no_body_is_being_read(deadlines: BodyDeadlines) -> None:
    await trickled(deadlines, 0.001).body(100)
    await asyncio.sleep(sweep_interval(TIMEOUT_S) + 0.05)
    assert deadlines._timer is None


async def test_without_deadlines_a_body_is_read_as_it_comes() -> None:
    assert await trickled(None, 0.001).body(100) == b"x" * 10
