"""The encoder's batching queue: images from concurrent requests wait up to `wait_ms` for company, then run
through the tower together (at most `max_images` per call) on a worker thread, so the event loop keeps
answering /health and new requests meanwhile."""
from __future__ import annotations

import asyncio
import time

from engine.multimodal.inputs import ImageInput


class EncodeBatcher:
    def __init__(self, encode, max_images: int, wait_ms: float):
        self.encode = encode  # list[ImageInput] -> list[rows]
        self.max_images, self.wait_s = max_images, wait_ms / 1e3
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches = self.images = 0
        self.busy_s = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, images: list[ImageInput]) -> list:
        futures = [asyncio.get_running_loop().create_future() for _ in images]
        for img, fut in zip(images, futures):
            self.queue.put_nowait((img, fut))
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_images:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    break
            batch = [(img, fut) for img, fut in batch if not fut.done()]  # its request was cancelled
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                rows = await asyncio.to_thread(self.encode, [img for img, _ in batch])
            except Exception as e:  # a bad batch fails its requests, not the server
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.busy_s += time.monotonic() - t0
            self.batches += 1
            self.images += len(batch)
            for (_, fut), r in zip(batch, rows):
                if not fut.done():
                    fut.set_result(r)
