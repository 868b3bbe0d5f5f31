"""One model thread behind a bounded queue. Torch runs one request at a time here (the model and
its feature cache are not re-entrant for our use); requests past the queue's size are refused
at once with QueueFull (HTTP 429) rather than piling up latency."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from medplib.serving.errors import QueueFull

T = TypeVar("T")


class ModelWorker:
    def __init__(self, queue_size: int):
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medplib-model")
        self._queue: asyncio.Queue[tuple[Callable[[], Any], asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, fn: Callable[[], T]) -> "asyncio.Future[T]":
        """Queue `fn` for the model thread; its result (or exception) arrives in the future."""
        if self._queue is None:
            raise RuntimeError("the worker is not started")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((fn, fut))
        except asyncio.QueueFull:
            raise QueueFull(f"the server is busy ({self.queue_size} requests waiting); retry later") from None
        return fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            fn, fut = await self._queue.get()
            if fut.cancelled():  # the client went away while waiting
                continue
            try:
                result = await loop.run_in_executor(self._executor, fn)
            except Exception as exc:  # noqa: BLE001 - handed to the request that asked
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
