"""Requests arriving close together batched into one backbone pass (bounded wait, bounded
batch), so throughput grows with load."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import torch

from inca.runtime.config import ServerConfig
from inca.runtime.multitask import MultiTaskModel


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, S, S)
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects requests into batches for one backbone pass each (a single worker)."""

    def __init__(self, model: MultiTaskModel, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.lock = threading.Lock()  # one pass at a time: the CPU/GPU is shared anyway
        self.batches_run = 0
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
            return self.model.predict_proba(images, batch_size=max(len(images), 1))

    async def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities of every task for ``images``, batched with concurrent requests."""
        if not self.config.batching:
            return await asyncio.to_thread(self._infer, images)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(images, future))
        return await future

    async def _run(self) -> None:
        wait = self.config.max_wait_ms / 1000
        while True:
            jobs = [await self.queue.get()]
            count = len(jobs[0].images)
            deadline = asyncio.get_running_loop().time() + wait
            while count < self.config.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
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
