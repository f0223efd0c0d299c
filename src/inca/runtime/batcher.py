"""Bounded work: requests arriving close together batched into one backbone pass (bounded
wait, bounded batch, bounded queue), and images decoded by a small pool with back-pressure.

Neither waits without bound: past its limit a request gets 503 with ``Retry-After`` at
once, so an overloaded server sheds load instead of letting every client time out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import HTTPException

from inca.runtime.config import ServerConfig
from inca.runtime.multitask import MultiTaskModel


def busy(what: str, config: ServerConfig) -> HTTPException:
    """A 503 that tells the client when to retry."""
    return HTTPException(503, f"the server is busy ({what}); retry in {config.retry_after_s} "
                              "s", headers={"Retry-After": str(config.retry_after_s)})


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, S, S)
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects requests into batches for one backbone pass each (a single worker).

    Attributes:
        pending: images admitted and not yet answered (the queue's depth).
        batches_run: backbone passes run.
    """

    def __init__(self, model: MultiTaskModel, config: ServerConfig,
                 on_batch: Callable[[int], Any] = lambda n: None) -> None:
        self.model = model
        self.config = config
        self.on_batch = on_batch  # told every pass's image count (metrics)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.lock = threading.Lock()  # one pass at a time: the CPU/GPU is shared anyway
        self.batches_run = 0
        self.pending = 0
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    def _infer(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.lock:
            self.batches_run += 1
            self.on_batch(len(images))
            return self.model.predict_proba(images, batch_size=max(len(images), 1))

    def warm_up(self, images: torch.Tensor) -> None:
        """One pass outside the counts (plans the heads, warms the kernels)."""
        with self.lock:
            self.model.predict_proba(images, batch_size=max(len(images), 1))

    async def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities of every task for ``images``, batched with concurrent requests;
        503 at once when the queue would pass ``max_queue_images``."""
        n = len(images)
        if self.pending + n > self.config.max_queue_images:
            raise busy(f"{self.pending} images are waiting for the model, the limit is "
                       f"{self.config.max_queue_images}", self.config)
        self.pending += n
        try:
            if not self.config.batching:
                return await asyncio.to_thread(self._infer, images)
            future = asyncio.get_running_loop().create_future()
            self.queue.put_nowait(_Job(images, future))
            return await future
        finally:
            self.pending -= n

    async def _next(self) -> _Job:
        """The next job whose client still waits (a timed-out request's job is dropped)."""
        while (job := await self.queue.get()).future.done():
            pass
        return job

    async def _run(self) -> None:
        wait = self.config.max_wait_ms / 1000
        while True:
            jobs = [await self._next()]
            count = len(jobs[0].images)
            deadline = asyncio.get_running_loop().time() + wait
            while count < self.config.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._next(), timeout)
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                count += len(job.images)
            try:
                probs = await asyncio.to_thread(
                    self._infer, torch.cat([j.images for j in jobs]))
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                n = len(j.images)
                if not j.future.done():
                    j.future.set_result({k: v[start:start + n] for k, v in probs.items()})
                start += n


class DecodePool:
    """``decode_threads`` threads for decoding; past ``max_decode_waiting`` queued requests a
    request gets 503 at once (back-pressure). A request that timed out keeps its place
    until its thread finishes: the count is of work really queued or running.

    Attributes:
        pending: requests queued or decoding.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.limit = config.decode_threads + config.max_decode_waiting
        self.pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="inca-decode")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a decode thread."""
        with self._lock:
            if self.pending >= self.limit:
                raise busy(f"{self.pending} requests are decoding or waiting to, the limit "
                           f"is {self.limit}", self.config)
            self.pending += 1
        try:
            job = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        job.add_done_callback(self._done)  # also when cancelled before it started
        return await asyncio.wrap_future(job)

    def _done(self, _job: Any) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
