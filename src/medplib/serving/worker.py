"""One model thread behind a bounded queue, decoding waiting requests together.

Torch runs one model call at a time here (the model and its feature cache are not re-entrant for
our use). Requests past the queue's size are refused at once with QueueFull (HTTP 429) rather than
piling up latency. A batchable request (`submit_batched`) that reaches the model thread takes the
batchable requests waiting behind it, up to `max_batch`, into one call of `run_batch`: nobody
waits for a batch to fill, so a lone request starts at once, and under load the requests that
queued during one batch form the next. A call given alone (`submit`) runs alone, in queue order.

`run_batch(items) -> results` returns one result or exception per item; an exception it raises
for the whole batch sends each of the batch's items through `run_batch` again on its own, so a
request that breaks a batch fails alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from medplib.serving.errors import QueueFull

T = TypeVar("T")


@dataclass
class _Task:
    fut: "asyncio.Future[Any]"
    fn: Callable[[], Any] | None = None  # run alone
    item: Any = None  # or batched with others through run_batch


class ModelWorker:
    def __init__(self, queue_size: int, max_batch: int = 1,
                 run_batch: Callable[[list[Any]], Sequence[Any]] | None = None):
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.queue_size, self.max_batch, self.run_batch = queue_size, max_batch, run_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medplib-model")
        self._queue: asyncio.Queue[_Task] | None = None
        self._carry: _Task | None = None  # a lone call met while filling a batch: it runs next
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []  # the size of every batch run (for tests and benchmarks)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet started."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None)

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _put(self, task: _Task) -> "asyncio.Future[Any]":
        if self._queue is None:
            raise RuntimeError("the worker is not started")
        try:
            self._queue.put_nowait(task)
        except asyncio.QueueFull:
            raise QueueFull(f"the server is busy ({self.queue_size} requests waiting); retry later") from None
        return task.fut

    def submit(self, fn: Callable[[], T]) -> "asyncio.Future[T]":
        """Queue `fn` for the model thread, to run alone; its result (or exception) arrives in the future."""
        return self._put(_Task(asyncio.get_running_loop().create_future(), fn=fn))

    def submit_batched(self, item: Any) -> "asyncio.Future[Any]":
        """Queue `item` for `run_batch`, together with whatever batchable items wait beside it."""
        if self.run_batch is None:
            raise RuntimeError("this worker has no run_batch")
        return self._put(_Task(asyncio.get_running_loop().create_future(), item=item))

    def _next_batch(self, first: _Task) -> list[_Task]:
        """`first` and the batchable tasks queued right behind it, up to max_batch (no waiting)."""
        group = [first]
        assert self._queue is not None
        while first.fn is None and len(group) < self.max_batch and not self._queue.empty():
            task = self._queue.get_nowait()
            if task.fut.cancelled():
                continue
            if task.fn is not None:  # a lone call: it keeps its place, right after this batch
                self._carry = task
                break
            group.append(task)
        return group

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                first = await self._queue.get()
            if first.fut.cancelled():  # the client went away while waiting
                continue
            group = self._next_batch(first)
            if first.fn is not None:
                await self._settle(loop, [first], lambda fn=first.fn: [fn()], alone=True)  # type: ignore[misc]
                continue
            self.batch_sizes.append(len(group))
            items = [t.item for t in group]
            ok = await self._settle(loop, group, lambda items=items: self.run_batch(items),  # type: ignore[misc]
                                    alone=len(group) == 1)
            if not ok:  # the batch as a whole failed: each of its requests again, on its own
                for task in group:
                    self.batch_sizes.append(1)
                    await self._settle(loop, [task], lambda t=task: self.run_batch([t.item]), alone=True)  # type: ignore[misc]

    async def _settle(self, loop: asyncio.AbstractEventLoop, group: list[_Task], call: Callable[[], Sequence[Any]],
                      alone: bool) -> bool:
        """Run `call` on the model thread and hand each task its result or exception. Returns False
        (settling nothing) when a call for several tasks raised, so they can be retried one by one."""
        try:
            results = await loop.run_in_executor(self._executor, call)
            if len(results) != len(group):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(group)} requests")
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) that asked
            if not alone:
                return False
            results = [exc]
        for task, result in zip(group, results):
            if task.fut.done():
                continue
            if isinstance(result, BaseException):
                task.fut.set_exception(result)
            else:
                task.fut.set_result(result)
        return True
