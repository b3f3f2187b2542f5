"""The server's batching runtime: requests from many clients queue per (expert, direction); one compute thread
takes the pool whose oldest request waited longest, fills a batch of up to `max_batch_size` rows (waiting at most
`batch_wait` seconds past that request's arrival for more, but only while another recently active sender of that
pool has nothing queued: a batch that no one else can join is computed at once), runs it on the device and splits
the results."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from hiveengine.errors import ConfigurationError, PeerBusyError, ProtocolError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 4096  # rows one batch may hold; a larger single request is refused
DEFAULT_BATCH_WAIT = 0.002  # seconds a batch may wait past its first request's arrival to fill up
DEFAULT_MAX_QUEUED_ROWS = 1 << 20  # rows queued per pool before new requests are refused as busy
STOP_TIMEOUT = 30.0  # seconds shutdown waits for the batch in progress
ACTIVE_SENDER_WINDOW = 5.0  # seconds a sender counts as active in a pool after its last request there

BatchFn = Callable[[list[torch.Tensor], list[Hashable | None], list[int]], list[torch.Tensor]]


@dataclass(eq=False)
class Task:
    """One request: its tensors (batch-first), row count, optional key, who sent it (None: unknown) and the future
    its results go to."""

    tensors: list[torch.Tensor]
    rows: int
    key: Hashable | None = None
    sender: Hashable | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def sample_shapes(self) -> tuple:
        return tuple((t.shape[1:], t.dtype, t.device) for t in self.tensors)


@dataclass(eq=False)
class TaskPool:
    """Queued requests of one kind for one expert, and the function that computes a batch of them."""

    name: str
    process: BatchFn
    merge_keyed: bool = True  # False: a request with a key is computed alone (e.g. to keep its activations)
    tasks: deque[Task] = field(default_factory=deque)
    senders: dict[Hashable, float] = field(default_factory=dict)  # known senders: when each last submitted
    queued_rows: int = 0
    processed_rows: int = 0
    processed_batches: int = 0


@dataclass(frozen=True)
class RuntimeStats:
    """Totals since start: rows and batches per pool name."""

    rows: dict[str, int]
    batches: dict[str, int]


class BatchingRuntime:
    """A compute thread serving `TaskPool`s; `submit` may be called from any thread."""

    def __init__(
        self,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait: float = DEFAULT_BATCH_WAIT,
        max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS,
        synchronize: Callable[[], None] | None = None,
    ):
        if max_batch_size < 1 or batch_wait < 0 or max_queued_rows < max_batch_size:
            raise ConfigurationError(
                f"need max_batch_size >= 1, batch_wait >= 0, max_queued_rows >= max_batch_size; got "
                f"{max_batch_size}, {batch_wait}, {max_queued_rows}"
            )
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.max_queued_rows = max_queued_rows
        self.synchronize = synchronize
        self.pools: list[TaskPool] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hiveengine-moe-runtime", daemon=True)

    def add_pool(self, name: str, process: BatchFn, merge_keyed: bool = True) -> TaskPool:
        """A new pool computed by `process(batched tensors, the requests' keys, their row counts) -> batched
        results`; with `merge_keyed=False`, requests that carry a key are never batched with others."""
        pool = TaskPool(name, process, merge_keyed)
        with self._cv:
            self.pools.append(pool)
        return pool

    def start(self) -> None:
        """Start the runtime's thread, which forms and runs batches until `shutdown()`."""
        self._thread.start()

    def submit(
        self,
        pool: TaskPool,
        tensors: Sequence[torch.Tensor],
        rows: int,
        key: Hashable | None = None,
        sender: Hashable | None = None,
    ) -> concurrent.futures.Future:
        """Queue a request; its future gets the request's rows of the batch results (or the batch's error). With
        `sender`, a batch waits for more requests only while some other sender of this pool is active."""
        if rows > self.max_batch_size:
            raise ProtocolError(
                f"{pool.name}: a request of {rows} rows exceeds this server's max_batch_size of "
                f"{self.max_batch_size}; split it into smaller requests"
            )
        task = Task(list(tensors), rows, key, sender)
        with self._cv:
            if self._stopped:
                raise PeerBusyError(f"{pool.name}: the server is shutting down")
            if pool.queued_rows + rows > self.max_queued_rows:
                raise PeerBusyError(f"{pool.name}: {pool.queued_rows} rows queued already; retry later")
            pool.tasks.append(task)
            pool.queued_rows += rows
            if sender is not None:
                pool.senders[sender] = task.arrived
            self._cv.notify()
        return task.future

    def stats(self) -> RuntimeStats:
        """Rows and batches each pool has processed so far."""
        with self._cv:
            return RuntimeStats(
                {p.name: p.processed_rows for p in self.pools}, {p.name: p.processed_batches for p in self.pools}
            )

    def shutdown(self) -> None:
        """Stop after the batch in progress; queued requests fail."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)
        for pool in self.pools:
            for task in pool.tasks:
                if task.future.set_running_or_notify_cancel():
                    task.future.set_exception(PeerBusyError(f"{pool.name}: the server shut down"))
            pool.tasks.clear()

    # ---- the compute thread

    def _run(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            pool, batch = picked
            self._compute(pool, batch)

    def _next_batch(self) -> tuple[TaskPool, list[Task]] | None:
        with self._cv:
            while not self._stopped:
                pool = min((p for p in self.pools if p.tasks), key=lambda p: p.tasks[0].arrived, default=None)
                if pool is None:
                    self._cv.wait()
                    continue
                wait = pool.tasks[0].arrived + self.batch_wait - time.monotonic()
                alone = not pool.merge_keyed and pool.tasks[0].key is not None
                fillable = self._fillable_rows(pool) < self.max_batch_size and self._others_may_send(pool)
                if wait > 0 and not alone and fillable:
                    self._cv.wait(wait)
                    continue
                batch = self._take(pool)
                if batch:
                    return pool, batch
            return None

    @staticmethod
    def _mergeable(pool: TaskPool, first: Task, task: Task) -> bool:
        keyed = first.key is not None or task.key is not None
        return task.sample_shapes == first.sample_shapes and (pool.merge_keyed or not keyed or task is first)

    @staticmethod
    def _others_may_send(pool: TaskPool) -> bool:
        """Whether a request that could join the queued ones may still come: some queued request has an unknown
        sender, or a sender active within ACTIVE_SENDER_WINDOW has nothing queued (forgets the inactive ones)."""
        queued = {t.sender for t in pool.tasks}
        if None in queued:
            return True
        now = time.monotonic()
        pool.senders = {s: last for s, last in pool.senders.items() if now - last <= ACTIVE_SENDER_WINDOW}
        return any(s not in queued for s in pool.senders)

    def _fillable_rows(self, pool: TaskPool) -> int:
        first = pool.tasks[0]
        return sum(t.rows for t in pool.tasks if self._mergeable(pool, first, t))

    def _take(self, pool: TaskPool) -> list[Task]:
        """Pop the oldest task and every later one that may join it and fits; skip cancelled ones."""
        first = pool.tasks[0]
        batch, rows, kept = [], 0, deque()
        while pool.tasks:
            task = pool.tasks.popleft()
            fits = self._mergeable(pool, first, task) and rows + task.rows <= self.max_batch_size
            if not fits:
                kept.append(task)
                continue
            pool.queued_rows -= task.rows
            if task.future.set_running_or_notify_cancel():  # False: its caller gave up while it queued
                batch.append(task)
                rows += task.rows
        pool.tasks = kept
        return batch

    def _compute(self, pool: TaskPool, batch: list[Task]) -> None:
        try:
            tensors = [
                torch.cat(parts) if len(parts) > 1 else parts[0]
                for parts in zip(*(t.tensors for t in batch), strict=True)
            ]
            results = pool.process(tensors, [t.key for t in batch], [t.rows for t in batch])
            if self.synchronize is not None:
                self.synchronize()  # results must be in memory before the transport thread sends them
        except Exception as e:
            if not isinstance(e, ProtocolError):
                logger.exception("%s: a batch of %d requests failed", pool.name, len(batch))
            for task in batch:
                task.future.set_exception(e)
            return
        sizes = [t.rows for t in batch]
        pieces = [r.split(sizes) for r in results]
        for i, task in enumerate(batch):
            task.future.set_result([p[i] for p in pieces])
        with self._cv:
            pool.processed_rows += sum(sizes)
            pool.processed_batches += 1
