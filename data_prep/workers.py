"""Worker processes with an ordered parallel map that reads ahead only a bounded amount, and a progress bar."""

from __future__ import annotations

import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

PENDING_CHUNKS_PER_WORKER = 4  # bounds the results (normalised images) waiting in memory for the consumer


class _Feed:
    """Hands items to Pool.imap's feeding thread only while few results wait for the consumer."""

    def __init__(self, items: list, limit: int):
        self.items = items
        self._slots = threading.Semaphore(limit)
        self._stopped = threading.Event()

    def __iter__(self) -> Iterator:
        for item in self.items:
            self._slots.acquire()
            if self._stopped.is_set():
                return
            yield item

    def consumed_one(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        """Wake and end the feeding thread: until it ends, the pool can neither run other work nor shut down."""
        self._stopped.set()
        self._slots.release()


class Workers:
    """Worker processes (none when num_workers is 0) with an ordered map that reads ahead a bounded amount.

    Pool.imap alone reads its whole input ahead and buffers every result the consumer has not taken yet, so
    normalised images would pile up in memory whenever the shard writer is slower than the workers.
    Leaving the context, also on an error in the consumer, stops every feed before the pool shuts down.
    """

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self._pool: multiprocessing.pool.Pool | None = None
        self._feeds: list[_Feed] = []

    def __enter__(self) -> Workers:
        if self.num_workers > 0:
            self._pool = multiprocessing.Pool(self.num_workers)
        return self

    def __exit__(self, *exc_info) -> None:
        for feed in self._feeds:
            feed.stop()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def ordered_map(self, function: Callable, items: list, chunksize: int) -> Iterator:
        """function over items, results in input order, at most a few chunks per worker ahead of the consumer."""
        if self._pool is None:
            yield from map(function, items)
            return
        feed = _Feed(items, limit=chunksize * self.num_workers * PENDING_CHUNKS_PER_WORKER)
        self._feeds.append(feed)
        try:
            for result in self._pool.imap(function, feed, chunksize):
                feed.consumed_one()
                yield result
        finally:
            feed.stop()


def progress_bar(iterable: Iterable, total: int, description: str, unit: str = "img") -> tqdm:
    return tqdm(iterable, total=total, desc=description, unit=unit, mininterval=1.0, file=sys.stderr)
