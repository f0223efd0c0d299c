"""Bounded work: requests arriving close together batched into one backbone pass (bounded
wait, bounded batch, bounded queue), and images decoded by a small pool with back-pressure.

Neither waits without bound: past its limit a request gets 503 with ``Retry-After`` at
once, so an overloaded server sheds load instead of letting every client time out.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
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
    """Two lanes of decode threads. A request whose images hold at most ``cheap_pixels``
    together (read from their headers) is decoded on a thread of its own lane, so it never
    queues behind expensive images; the others on ``decode_threads`` threads that run at a
    lower CPU priority (Linux), so expensive images cannot take the cores from the backbone
    pass and the cheap lane either. In each lane, past ``max_decode_waiting`` queued requests
    a request gets 503 at once (back-pressure). A request that timed out keeps its place
    until its thread finishes: the counts are of work really queued or running.

    Attributes:
        pending: requests queued or decoding, in both lanes.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cheap_pixels = config.cheap_pixels
        self._lanes = {"cheap": _Lane("inca-decode-cheap", 1, config),
                       "expensive": _Lane("inca-decode", config.decode_threads, config,
                                          nice=config.decode_nice)}

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self._lanes.values())

    async def run(self, fn: Callable[..., Any], *args: Any, pixels: float = math.inf) -> Any:
        """``fn(*args)`` on a decode thread of the lane that ``pixels`` (the request's
        images together, from their headers; unknown: expensive) picks."""
        cheap = pixels <= self.cheap_pixels
        return await self._lanes["cheap" if cheap else "expensive"].run(fn, *args)

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.pool.shutdown(wait=False, cancel_futures=True)


class _Lane:
    """``threads`` decode threads (niced by ``nice`` on Linux) and their back-pressure."""

    def __init__(self, name: str, threads: int, config: ServerConfig, nice: int = 0) -> None:
        self.config = config
        self.limit = threads + config.max_decode_waiting
        self.pending = 0
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name,
                                       initializer=_lower_priority, initargs=(nice,))

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self.pending >= self.limit:
                raise busy(f"{self.pending} requests are decoding or waiting to, the limit "
                           f"is {self.limit}", self.config)
            self.pending += 1
        try:
            job = self.pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        job.add_done_callback(self._done)  # also when cancelled before it started
        return await asyncio.wrap_future(job)

    def _done(self, _job: Any) -> None:
        with self._lock:
            self.pending -= 1


def _lower_priority(nice: int) -> None:
    """Lower this thread's CPU priority by ``nice`` (Linux: per thread; elsewhere it would
    lower the whole process's, so nothing is done)."""
    if nice and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:
            pass
