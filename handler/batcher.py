"""Dynamic batching for a server that has none: requests that arrive close together share one pass.

KServe's Python ``ModelServer`` hands each request to the model on its own; TorchServe batches in
its frontend (``batchSize``, ``maxBatchDelay``). :class:`Batcher` gives the KServe predictor the
same behaviour inside the process. No server import here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)


class Batcher:
    """Requests that arrive within ``max_delay_s`` of the first share one call of ``run``.

    Args:
        run: answers a list of requests, in order (called in one worker thread).
        max_size: most requests per call.
        max_delay_s: how long the first request of a batch waits for others.
    """

    def __init__(self, run: Callable[[list], list], max_size: int, max_delay_s: float) -> None:
        self.run = run
        self.max_size = max(1, max_size)
        self.max_delay_s = max(0.0, max_delay_s)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradcam-pass")

    async def submit(self, request):
        """The answer to ``request``, once its batch has run."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="gradcam-batcher")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_delay_s
            while len(batch) < self.max_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            live = [(r, f) for r, f in batch if not f.cancelled()]  # a client that went away
            if not live:
                continue
            try:
                answers = await loop.run_in_executor(self._executor, self.run, [r for r, _ in live])
            except Exception as exc:  # the pipeline answers every request; this is a bug
                logger.exception("a batch of %d failed", len(live))
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), answer in zip(live, answers):
                if not future.done():
                    future.set_result(answer)
