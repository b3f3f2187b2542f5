"""Server: hosts experts behind a Peer, batches their requests on a BatchingRuntime, declares them in the DHT."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from hiveengine.dht import DHT, get_dht_time
from hiveengine.errors import ConfigurationError, MembershipError, ProtocolError, refuse_unknown_options
from hiveengine.moe.declarations import adeclare_experts
from hiveengine.moe.errors import SampleTooLargeError
from hiveengine.moe.protocol import BACKWARD, DHT_TIMEOUT, FORWARD, FORWARD_ID, INFO
from hiveengine.moe.server.backend import DEFAULT_MAX_KEPT_BYTES, ExpertBackend, SchedulerFactory
from hiveengine.moe.server.experts import get_expert_class
from hiveengine.moe.server.runtime import DEFAULT_BATCH_WAIT, DEFAULT_MAX_BATCH_SIZE, BatchingRuntime, RuntimeStats
from hiveengine.transport import DEFAULT_LIMITS, Peer, Request
from hiveengine.transport.membership import may_host_experts

logger = logging.getLogger(__name__)

# hivemind's Server.create / ExpertBackend arguments that hiveengine spells differently, and what to use.
HIVEMIND_SPELLINGS = {
    "expert_uids": "uids=",
    "optim_cls": "optimizer= (a factory taking the parameters)",
    "num_warmup_steps": "scheduler= (a torch LR scheduler factory, e.g. a LambdaLR with your warm-up)",
    "num_training_steps": "scheduler= (a torch LR scheduler factory)",
    "num_total_steps": "scheduler= (a torch LR scheduler factory)",
    "num_handlers": "nothing: one batching runtime serves every expert",
    "min_batch_size": "batch_wait= (how long to wait to fill a batch)",
    "initial_peers": "dht=hiveengine.DHT(initial_peers=[...])",
    "stats_report_interval": "nothing here; `hiveengine serve --stats-interval`",
    "custom_module_path": "hiveengine.moe.register_expert_class (import your module first)",
    "compression": "nothing: expert tensors travel uncompressed",
    "expiration": "update_period= (declarations expire two periods after the last)",
}

DEFAULT_UPDATE_PERIOD = 30.0  # seconds between re-declarations of the experts in the DHT
DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # tensor bytes one request may carry; larger ones are refused unread
DEFAULT_MAX_CLIENT_BYTES = 256 << 20  # request bytes one client may have queued or in computation at once
DEFAULT_MAX_SAMPLE_BYTES = 4 << 20  # input bytes per sample (row): a transformer expert's 1024 x 1024 fp32 sequence
EXPIRATION_PERIODS = 2  # a declaration lives this many update periods, so one missed refresh does not hide them
CHECKPOINT_SUFFIX = ".pt"
MAX_CHECKPOINT_STEM = 200  # characters of a checkpoint's file name before its suffix; longer ones are hashed
START_TIMEOUT = 60.0

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class Server:
    """Serves `experts` ({uid: ExpertBackend}) over its own Peer; with a `dht`, declares them there every
    `update_period` seconds (expiring after EXPIRATION_PERIODS periods, signed by this Peer's identity: see
    declarations.py) until shut down.

    Defences against hostile clients: a request larger than `max_request_bytes` is refused by the transport before
    its tensors are received, and a batch of several requests holds at most that many bytes too (so one batch's
    compute, which nobody can interrupt, stays bounded); a request whose samples hold more than `max_sample_bytes`
    of inputs each is refused (one very long sequence costs quadratic time in attention); one client's requests
    queued or in computation hold at most `max_client_bytes` (more are refused as busy); batches are shared fairly
    between clients (runtime.py); requests holding NaN or Inf are refused (backend.py)."""

    def __init__(
        self,
        experts: dict[str, ExpertBackend],
        dht: DHT | None = None,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_wait: float = DEFAULT_BATCH_WAIT,
        update_period: float = DEFAULT_UPDATE_PERIOD,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_client_bytes: int = DEFAULT_MAX_CLIENT_BYTES,
        max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
        port: int | None = None,
        start: bool = True,
    ):
        if not experts:
            raise ConfigurationError("a Server needs at least one expert")
        if not may_host_experts():
            raise MembershipError(
                "this process's membership certificate does not allow hosting experts: ask the swarm's owner for "
                "an invite with `--role host-experts`"
            )
        if update_period <= 0:
            raise ConfigurationError(f"update_period must be positive, got {update_period}")
        if not 0 < max_request_bytes <= max_client_bytes or max_sample_bytes <= 0:
            raise ConfigurationError(
                f"need 0 < max_request_bytes <= max_client_bytes and max_sample_bytes > 0, got {max_request_bytes}, "
                f"{max_client_bytes} and {max_sample_bytes}"
            )
        self.max_sample_bytes = max_sample_bytes
        self.limits = dataclasses.replace(
            DEFAULT_LIMITS,
            max_message_bytes=max_request_bytes,
            max_frame_bytes=min(DEFAULT_LIMITS.max_frame_bytes, max_request_bytes),
            max_inbound_bytes_per_peer=max_client_bytes,
            max_inbound_bytes=max(DEFAULT_LIMITS.max_inbound_bytes, max_client_bytes),
        )
        self.experts = dict(experts)
        self.dht = dht
        self.update_period = update_period
        devices = {b.device for b in self.experts.values() if b.device.type == "cuda"}
        self.runtime = BatchingRuntime(
            max_batch_size, batch_wait, synchronize=_synchronizer(devices), max_batch_bytes=max_request_bytes
        )
        self._pools = {
            uid: (
                self.runtime.add_pool(f"{uid}.fwd", b.forward, screen=functools.partial(b.screen, "forward")),
                self.runtime.add_pool(f"{uid}.bwd", b.backward, screen=functools.partial(b.screen, "backward")),
            )
            for uid, b in self.experts.items()
        }
        self.peer: Peer | None = None
        self._declaring: asyncio.Task | None = None
        self._port = port
        if start:
            self.start()

    @classmethod
    def create(
        cls,
        expert_cls: str,
        uids: Sequence[str],
        hidden_dim: int,
        *,
        device: str = "cpu",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        clip_grad_norm: float | None = None,
        max_kept_bytes: int = DEFAULT_MAX_KEPT_BYTES,
        accumulate_batches: int = 1,
        seed: int | None = None,
        checkpoint_dir: str | Path | None = None,
        dht: DHT | None = None,
        start: bool = True,
        **kwargs,
    ) -> Server:
        """A server of `expert_cls` experts named `uids`, built on `device` (with `seed`: expert i from seed + i),
        restored from `checkpoint_dir` where a checkpoint exists; started unless `start=False`. Each expert gets
        its own `optimizer(parameters)` and `scheduler(optimizer)`, clips its gradients' norm to `clip_grad_norm`
        before each update, and keeps at most `max_kept_bytes` of forward activations for backward calls (see
        ExpertBackend); other keyword arguments go to the constructor."""
        refuse_unknown_options(
            "Server.create", {k: v for k, v in kwargs.items() if k in HIVEMIND_SPELLINGS}, HIVEMIND_SPELLINGS
        )
        klass = get_expert_class(expert_cls)
        experts = {}
        for i, uid in enumerate(uids):
            module = klass.build(hidden_dim, None if seed is None else seed + i).to(device)
            opt = optimizer(module.parameters()) if optimizer is not None else None
            experts[uid] = ExpertBackend(
                uid,
                module,
                klass.input_schema(hidden_dim),
                opt,
                device=device,
                accumulate_batches=accumulate_batches,
                scheduler=scheduler,
                clip_grad_norm=clip_grad_norm,
                max_kept_bytes=max_kept_bytes,
            )
        server = cls(experts, dht, start=False, **kwargs)
        if checkpoint_dir is not None:
            server.load_checkpoints(checkpoint_dir)
        if start:
            server.start()
        return server

    # ---- lifecycle

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start serving (and declaring); a no-op if started."""
        if self.peer is not None:
            return
        self.runtime.start()
        self.peer = Peer(port=self._port, limits=self.limits)
        self.peer.register(FORWARD, self._on_forward)
        self.peer.register(BACKWARD, self._on_backward)
        self.peer.register(INFO, self._on_info)
        if self.dht is not None:
            self.peer.runtime.run(self._declare_once(), timeout)
            self._declaring = self.peer.runtime.run(self._start_declaring(), timeout)
        logger.info("serving %d experts at %s", len(self.experts), self.peer.address)

    @property
    def address(self) -> str:
        """Where clients call these experts."""
        if self.peer is None:
            raise RuntimeError("the server is not started")
        return str(self.peer.address)

    def stats(self) -> RuntimeStats:
        """Rows and batches processed so far, per expert and direction."""
        return self.runtime.stats()

    def shutdown(self) -> None:
        """Stop declaring and serving; the DHT forgets the experts when their declarations expire. Idempotent."""
        if self.peer is None:
            return
        peer, self.peer = self.peer, None
        if not peer.runtime.closed:
            peer.runtime.run(self._stop_declaring(), DHT_TIMEOUT)
            peer.shutdown()
        self.runtime.shutdown()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- checkpoints

    def save_checkpoints(self, directory: str | Path) -> None:
        """Write each expert's module, optimizer and scheduler state to `directory/<uid>.pt` (atomically; see
        `checkpoint_path` for uids that are not plain file names)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for uid, backend in self.experts.items():
            path = checkpoint_path(directory, uid)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(backend.state_dict(), tmp)
            tmp.replace(path)

    def load_checkpoints(self, directory: str | Path) -> list[str]:
        """Restore every expert that has a checkpoint in `directory`; return their uids."""
        loaded = []
        for uid, backend in self.experts.items():
            path = checkpoint_path(directory, uid)
            if path.is_file():
                backend.load_state_dict(torch.load(path, map_location=backend.device, weights_only=True))
                loaded.append(uid)
        logger.info("loaded %d expert checkpoints from %s", len(loaded), directory)
        return loaded

    # ---- DHT declarations

    async def _declare_once(self) -> None:
        expiration = get_dht_time() + EXPIRATION_PERIODS * self.update_period
        stored = await adeclare_experts(
            self.dht, list(self.experts), str(self.peer.address), expiration, identity=self.peer.identity
        )
        logger.debug("declared %d experts (%d records stored)", len(self.experts), stored)

    async def _start_declaring(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._declare_forever())

    async def _declare_forever(self) -> None:
        while True:
            await asyncio.sleep(self.update_period)
            try:
                async with asyncio.timeout(DHT_TIMEOUT):
                    await self._declare_once()
            except Exception as e:
                logger.warning("could not declare experts in the DHT: %s: %s", type(e).__name__, e)

    async def _stop_declaring(self) -> None:
        if self._declaring is not None:
            self._declaring.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._declaring

    # ---- handlers (on the transport loop)

    def _backend(self, request: Request) -> ExpertBackend:
        uid = request.header.get("uid")
        backend = self.experts.get(uid) if isinstance(uid, str) else None
        if backend is None:
            raise ProtocolError(f"this server has no expert {uid!r:.80}; it serves {len(self.experts)} others")
        return backend

    async def _on_forward(self, request: Request) -> tuple[dict, list[torch.Tensor]]:
        return await self._run_batched(request, backward=False)

    async def _on_backward(self, request: Request) -> tuple[dict, list[torch.Tensor]]:
        return await self._run_batched(request, backward=True)

    async def _run_batched(self, request: Request, backward: bool) -> tuple[dict, list[torch.Tensor]]:
        """Check the request against the expert's schema and queue it in the expert's forward or backward pool."""
        backend = self._backend(request)
        rows = (backend.check_backward if backward else backend.check_forward)(request.tensors)
        inputs = sum(t.numel() * t.element_size() for t in request.tensors[: len(backend.input_schema)])
        per_sample = inputs / max(rows, 1)
        if per_sample > self.max_sample_bytes:
            raise SampleTooLargeError(
                f"{backend.uid}: samples of {per_sample:.0f} input bytes exceed this server's max_sample_bytes of "
                f"{self.max_sample_bytes} (e.g. shorter sequences, or a server started with a larger limit)"
            )
        pool = self._pools[backend.uid][int(backward)]
        future = self.runtime.submit(pool, request.tensors, rows, _forward_key(request), request.sender)
        return {}, await asyncio.wrap_future(future)

    async def _on_info(self, request: Request) -> dict:
        backend = self._backend(request)
        return {
            "inputs": [s.to_wire() for s in backend.input_schema],
            "parameters": sum(p.numel() for p in backend.module.parameters()),
            "updates": backend.updates,
            "lr": backend.learning_rates(),
            "kept_bytes": backend.kept_bytes,
            "kept_requests": backend.kept_requests,
            "skipped_updates": backend.skipped_updates,
        }


def checkpoint_path(directory: str | Path, uid: str) -> Path:
    """Where expert `uid`'s checkpoint lives in `directory`: `<uid>.pt`, with every character other than ASCII
    letters, digits and `_.-~` percent-encoded (so `/`, `..` or unicode cannot leave the directory or clash), and
    a hash instead of names longer than MAX_CHECKPOINT_STEM."""
    stem = urllib.parse.quote(uid, safe="")
    if len(stem) > MAX_CHECKPOINT_STEM:
        stem = "uid-" + hashlib.sha256(uid.encode()).hexdigest()
    return Path(directory) / f"{stem}{CHECKPOINT_SUFFIX}"


def _forward_key(request: Request) -> tuple | None:
    """Which client forward pass a request belongs to: the header's forward id, scoped to its sender."""
    fid = request.header.get(FORWARD_ID)
    return (request.sender, fid) if isinstance(fid, int) else None


def _synchronizer(devices: set[torch.device]) -> Callable[[], None] | None:
    """Wait for the compute thread's CUDA work on `devices` (None when every expert is on the CPU)."""
    if not devices:
        return None

    def synchronize() -> None:
        for device in devices:
            torch.cuda.current_stream(device).synchronize()

    return synchronize
