"""The KServe predictor's dynamic batching, in-process (no server): requests that arrive within
the delay share one call, up to the batch size, each gets its own answer in order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from handler.batcher import Batcher


def _run(coro):
    return asyncio.run(coro)


def test_requests_within_the_delay_share_one_call_up_to_the_batch_size():
    calls: list[list[int]] = []

    def run(batch):
        calls.append(list(batch))
        return [f"answer {r}" for r in batch]

    async def main():
        batcher = Batcher(run, max_size=4, max_delay_s=0.2)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    assert _run(main()) == [f"answer {i}" for i in range(10)]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_request_waits_no_longer_than_the_delay():
    def run(batch):
        return [r * 2 for r in batch]

    async def main():
        batcher = Batcher(run, max_size=8, max_delay_s=0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await batcher.submit(21)
        return answer, loop.time() - started

    answer, waited = _run(main())
    assert answer == 42 and waited < 5  # the delay, not a full batch


def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    gate = threading.Event()
    calls: list[list[int]] = []

    def run(batch):
        calls.append(list(batch))
        if len(calls) == 1:
            gate.wait(5)
        return list(batch)

    async def main():
        batcher = Batcher(run, max_size=8, max_delay_s=0.0)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch is running
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest)

    assert _run(main()) == (0, [1, 2, 3, 4, 5])
    assert calls == [[0], [1, 2, 3, 4, 5]]


def test_a_failing_run_fails_its_batch_and_the_next_batch_still_runs():
    def run(batch):
        if 0 in batch:
            raise RuntimeError("boom")
        return list(batch)

    async def main():
        batcher = Batcher(run, max_size=1, max_delay_s=0.0)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(0)
        return await batcher.submit(7)

    assert _run(main()) == 7
