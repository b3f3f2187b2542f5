"""The engine API: `hiveengine.init()` joins the swarm that `hiveengine launch` describes."""

from hiveengine.engine.engine import Engine, init
from hiveengine.engine.env import LaunchEnv

__all__ = ["Engine", "LaunchEnv", "init"]
