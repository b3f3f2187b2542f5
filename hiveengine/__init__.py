"""hiveengine: decentralized deep learning across the Internet, GPU-first."""

from hiveengine import errors
from hiveengine.errors import HiveEngineError

__version__ = "0.1.0"
__all__ = ["HiveEngineError", "__version__", "errors"]
