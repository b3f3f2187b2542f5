"""Launch configurations of the Triton kernels: autotuned winners cached per device in a JSON file.

The bench suite (``hiveengine bench kernels``) measures candidate configurations on each GPU and saves
the winners with save_launch_configs; launch_config returns the saved winner for a kernel and device,
else a default. The file maps a device name to {kernel key: {"tile": .., "num_warps": .., "num_stages": ..}}.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hiveengine.errors import ConfigurationError

logger = logging.getLogger(__name__)

TUNING_ENV = "HIVEENGINE_KERNEL_TUNING"
# Large tiles keep the CPU interpreter fast (it costs milliseconds per program instance).
INTERPRETER_TILE = 65536


@dataclass(frozen=True)
class LaunchConfig:
    """How to launch one kernel: values per program (a power of two), warps, and software-pipeline stages."""

    tile: int
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        if self.tile < 1 or self.tile & (self.tile - 1):
            raise ConfigurationError(f"tile must be a power of two, got {self.tile}")


DEFAULTS = {
    "quantize": LaunchConfig(4096, 4, 1),
    "dequantize": LaunchConfig(4096, 4, 1),
    "reduce": LaunchConfig(4096, 4, 2),
    "weighted_mean": LaunchConfig(2048, 4, 2),
    "cast": LaunchConfig(4096, 4, 1),
    "check_finite": LaunchConfig(4096, 4, 1),
}

_forced: LaunchConfig | None = None


def tuning_path() -> Path:
    """The autotuning cache: $HIVEENGINE_KERNEL_TUNING, else ~/.cache/hiveengine/kernel-tuning.json."""
    if os.environ.get(TUNING_ENV):
        return Path(os.environ[TUNING_ENV])
    return Path.home() / ".cache" / "hiveengine" / "kernel-tuning.json"


@functools.cache
def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable kernel tuning cache %s (%s); using defaults", path, e)
        return {}


def device_name(device: torch.device) -> str:
    """The name that keys a device's tuned configurations."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (TRITON_INTERPRET)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def config_key(kernel: str, **fields: object) -> str:
    """The cache key of a kernel specialization, e.g. "quantize:bits=8:block=1024"."""
    return ":".join([kernel, *(f"{k}={v}" for k, v in fields.items())])


def launch_config(kernel: str, device: torch.device, **fields: object) -> LaunchConfig:
    """The configuration to launch `kernel` with on `device`, for the specialization given by `fields`."""
    if _forced is not None:
        return _forced
    if interpreting():
        return LaunchConfig(INTERPRETER_TILE, 1, 1)
    entry = _load(tuning_path()).get(device_name(device), {}).get(config_key(kernel, **fields))
    return LaunchConfig(**entry) if entry else DEFAULTS[kernel]


@contextlib.contextmanager
def forced(config: LaunchConfig) -> Iterator[None]:
    """Launch every kernel with `config` inside this block (for the autotuner)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def save_launch_configs(device: str, winners: dict[str, LaunchConfig], path: Path | None = None) -> Path:
    """Merge a device's winning configurations ({config_key: config}) into the cache file."""
    path = path or tuning_path()
    table = dict(_load(path))
    table[device] = {**table.get(device, {}), **{k: asdict(v) for k, v in winners.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(path)
    _load.cache_clear()
    return path
