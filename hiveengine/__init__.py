"""hiveengine: decentralized deep learning across the Internet, GPU-first."""

from hiveengine import errors
from hiveengine.errors import HiveEngineError

__version__ = "0.1.0"
__all__ = [
    "DHT",
    "DecentralizedAverager",
    "Engine",
    "HiveEngineError",
    "Optimizer",
    "Peer",
    "RemoteExpert",
    "RemoteMixtureOfExperts",
    "ValueWithExpiration",
    "__version__",
    "errors",
    "init",
]
_LAZY = {
    "DHT": "hiveengine.dht",
    "ValueWithExpiration": "hiveengine.dht",
    "DecentralizedAverager": "hiveengine.averaging",
    "Peer": "hiveengine.transport",
    "Optimizer": "hiveengine.optim",
    "Engine": "hiveengine.engine",
    "init": "hiveengine.engine",
    "RemoteExpert": "hiveengine.moe",
    "RemoteMixtureOfExperts": "hiveengine.moe",
}


def __getattr__(name: str):
    """Import the heavier public classes on first use, so `import hiveengine` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hiveengine' has no attribute {name!r}")
