"""The server's batching runtime: requests from many clients queue per (expert, direction) and per sender; one
compute thread forms batches of up to `max_batch_size` rows and `max_batch_bytes` bytes (one request larger than
that is a batch by itself), runs them on the device, then splits the results.

Fairness: a batch starts with the queued request of the sender served least recently (of those with requests
queued, in any pool; among never-served ones, the oldest request), and fills up round-robin over the senders of
that pool, so each sender gets an equal share of a batch it shares. A client flooding the server with requests
(or sending a costly one) therefore delays another client by about one batch, not by its whole queue, and
`max_batch_bytes` bounds what one batch holds (the Server also bounds each request and each sender's queued bytes
at its transport). A batch waits at most `batch_wait` seconds past its first request's arrival for more, and
only while another recently active sender of that pool has nothing queued: a batch no one else can join is
computed at once.
"""

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
DEFAULT_MAX_BATCH_BYTES = 64 << 20  # tensor bytes one batch may hold (it bounds one batch's compute time)
STOP_TIMEOUT = 30.0  # seconds shutdown waits for the batch in progress
ACTIVE_SENDER_WINDOW = 5.0  # seconds a sender counts as active in a pool after its last request there

BatchFn = Callable[[list[torch.Tensor], list[Hashable | None], list[int]], list[torch.Tensor]]
ScreenFn = Callable[[list[list[torch.Tensor]]], list[Exception | None]]  # per request: why it is refused, or None


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
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def sample_shapes(self) -> tuple:
        return tuple((t.shape[1:], t.dtype, t.device) for t in self.tensors)


@dataclass(eq=False)
class TaskPool:
    """Queued requests of one kind for one expert, per sender in arrival order, and the function that computes a
    batch of them."""

    name: str
    process: BatchFn
    merge_keyed: bool = True  # False: a request with a key is computed alone (e.g. to keep its activations)
    screen: ScreenFn | None = None  # refuses single requests of a batch before it is computed
    queues: dict[Hashable | None, deque[Task]] = field(default_factory=dict)  # only non-empty ones
    senders: dict[Hashable, float] = field(default_factory=dict)  # known senders: when each last submitted
    queued_rows: int = 0
    processed_rows: int = 0
    processed_batches: int = 0

    @property
    def tasks(self) -> list[Task]:
        """Every queued task (any order)."""
        return [task for queue in self.queues.values() for task in queue]


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
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        if max_batch_size < 1 or batch_wait < 0 or max_queued_rows < max_batch_size or max_batch_bytes < 1:
            raise ConfigurationError(
                f"need max_batch_size >= 1, batch_wait >= 0, max_queued_rows >= max_batch_size, max_batch_bytes >= "
                f"1; got {max_batch_size}, {batch_wait}, {max_queued_rows}, {max_batch_bytes}"
            )
        self.max_batch_size = max_batch_size
        self.max_batch_bytes = max_batch_bytes
        self.batch_wait = batch_wait
        self.max_queued_rows = max_queued_rows
        self.synchronize = synchronize
        self.pools: list[TaskPool] = []
        self._batches = 0  # batches formed so far
        self._served: dict[Hashable | None, int] = {}  # senders with queued requests: the last batch they were in
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hiveengine-moe-runtime", daemon=True)

    def add_pool(
        self, name: str, process: BatchFn, merge_keyed: bool = True, screen: ScreenFn | None = None
    ) -> TaskPool:
        """A new pool computed by `process(batched tensors, the requests' keys, their row counts) -> batched
        results`; with `merge_keyed=False`, requests that carry a key are never batched with others. `screen`
        (on the compute thread) gets each batch's requests first: the ones it names an error for fail with it
        alone, and the batch goes on without them."""
        pool = TaskPool(name, process, merge_keyed, screen)
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
            pool.queues.setdefault(sender, deque()).append(task)
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
            pool.queues.clear()

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
                picked = self._first_task()
                if picked is None:
                    self._cv.wait()
                    continue
                pool, first = picked
                wait = first.arrived + self.batch_wait - time.monotonic()
                alone = not pool.merge_keyed and first.key is not None
                fillable = self._fillable(pool, first) and self._others_may_send(pool)
                if wait > 0 and not alone and fillable:
                    self._cv.wait(wait)
                    continue
                batch = self._take(pool, first)
                if batch:
                    return pool, batch
            return None

    def _priority(self, sender: Hashable | None, task: Task) -> tuple[int, float]:
        return self._served.get(sender, -1), task.arrived

    def _first_task(self) -> tuple[TaskPool, Task] | None:
        """The pool and task the next batch starts with: the first queued task of the sender served least
        recently (ties: the oldest task)."""
        best = None
        for pool in self.pools:
            for sender, queue in pool.queues.items():
                priority = self._priority(sender, queue[0])
                if best is None or priority < best[0]:
                    best = priority, pool, queue[0]
        return None if best is None else (best[1], best[2])

    @staticmethod
    def _mergeable(pool: TaskPool, first: Task, task: Task) -> bool:
        keyed = first.key is not None or task.key is not None
        return task.sample_shapes == first.sample_shapes and (pool.merge_keyed or not keyed or task is first)

    @staticmethod
    def _others_may_send(pool: TaskPool) -> bool:
        """Whether a request that could join the queued ones may still come: some queued request has an unknown
        sender, or a sender active within ACTIVE_SENDER_WINDOW has nothing queued (forgets the inactive ones)."""
        if None in pool.queues:
            return True
        now = time.monotonic()
        pool.senders = {s: last for s, last in pool.senders.items() if now - last <= ACTIVE_SENDER_WINDOW}
        return any(s not in pool.queues for s in pool.senders)

    def _fillable(self, pool: TaskPool, first: Task) -> bool:
        """Whether the requests queued that may join `first` leave room in its batch."""
        mergeable = [t for t in pool.tasks if self._mergeable(pool, first, t)]
        return not self._full(sum(t.rows for t in mergeable), sum(t.nbytes for t in mergeable))

    def _full(self, rows: int, nbytes: int) -> bool:
        return rows >= self.max_batch_size or nbytes >= self.max_batch_bytes

    def _take(self, pool: TaskPool, first: Task) -> list[Task]:
        """Take `first`, then, round-robin over the pool's senders (least recently served first), each one's next
        task that may join it and fits, until the batch is full; skip cancelled tasks."""
        order = sorted(pool.queues, key=lambda s: self._priority(s, pool.queues[s][0]))
        order.remove(first.sender)
        order.append(first.sender)  # `first` was its sender's turn
        candidates = {
            s: iter([t for t in pool.queues[s] if t is not first and self._mergeable(pool, first, t)]) for s in order
        }
        taken: set[int] = set()
        batch, rows, nbytes = [], 0, 0

        def offer(task: Task) -> None:
            nonlocal rows, nbytes
            taken.add(id(task))
            pool.queued_rows -= task.rows
            if task.future.set_running_or_notify_cancel():  # False: its caller gave up while it queued
                batch.append(task)
                rows, nbytes = rows + task.rows, nbytes + task.nbytes

        def fits(task: Task) -> bool:
            return rows + task.rows <= self.max_batch_size and nbytes + task.nbytes <= self.max_batch_bytes

        offer(first)
        while candidates and not self._full(rows, nbytes):
            for sender in list(candidates):
                task = next(candidates[sender], None)
                while task is not None and not fits(task):
                    task = next(candidates[sender], None)
                if task is None:
                    del candidates[sender]
                    continue
                offer(task)
        self._batches += 1
        for sender in order:
            left = deque(t for t in pool.queues[sender] if id(t) not in taken)
            if left:
                pool.queues[sender] = left
            else:
                del pool.queues[sender]
        for task in batch:
            self._served[task.sender] = self._batches
        queued = {s for p in self.pools for s in p.queues}
        self._served = {s: b for s, b in self._served.items() if s in queued}
        return batch

    @staticmethod
    def _screened(pool: TaskPool, batch: list[Task]) -> list[Task]:
        """The tasks of `batch` that the pool's screen lets through; the others fail with its reason."""
        if pool.screen is None:
            return batch
        try:
            refusals = pool.screen([t.tensors for t in batch])
        except Exception as e:
            logger.exception("%s: screening a batch of %d requests failed", pool.name, len(batch))
            refusals = [e] * len(batch)
        passed = []
        for task, error in zip(batch, refusals, strict=True):
            if error is None:
                passed.append(task)
            else:
                task.future.set_exception(error)
        return passed

    def _compute(self, pool: TaskPool, batch: list[Task]) -> None:
        batch = self._screened(pool, batch)
        if not batch:
            return
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
