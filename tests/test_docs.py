"""The project's user-facing metadata: version, license, changelog."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import hiveengine

ROOT = Path(__file__).resolve().parent.parent


def test_version_flag_prints_the_package_version():
    out = subprocess.run(
        [sys.executable, "-m", "hiveengine.cli", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == f"hiveengine {hiveengine.__version__}"


def test_version_agrees_with_metadata_and_changelog():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == hiveengine.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(hiveengine.__version__)}\b", changelog, re.M)
    assert "## Unreleased" in changelog


def test_license_is_the_apache_license_the_metadata_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


# The packages whose public names the API reference documents (docs/reference/*.md).
PACKAGES = [
    "hiveengine",
    "hiveengine.engine",
    "hiveengine.optim",
    "hiveengine.dht",
    "hiveengine.averaging",
    "hiveengine.moe",
    "hiveengine.transport",
    "hiveengine.codec",
    "hiveengine.kernels",
    "hiveengine.errors",
]
# Public names still without a docstring in modules being rewritten as this was written; each is listed once
# so that the test catches every new one. Remove a line when its docstring lands.
UNDOCUMENTED = {
    "hiveengine.averaging.allreduce.AllReduceService.close_round",
    "hiveengine.averaging.allreduce.AllReduceService.open_round",
    "hiveengine.dht.node.DHTNode.num_keys",
    "hiveengine.dht.node.DHTNode.num_peers",
    "hiveengine.transport.address.PeerAddress.parse",
    "hiveengine.transport.identity.Identity.generate",
    "hiveengine.transport.identity.Identity.private_bytes",
    "hiveengine.transport.identity.Identity.sign",
    "hiveengine.transport.identity.PeerID.from_public_key",
    "hiveengine.transport.identity.PeerID.from_string",
    "hiveengine.transport.peer.Peer.address",
    "hiveengine.transport.peer.Peer.peer_id",
    "hiveengine.transport.runtime.Runtime.call_soon",
    "hiveengine.transport.runtime.Runtime.get",
    "hiveengine.transport.runtime.Runtime.in_loop_thread",
    "hiveengine.transport.runtime.Runtime.register_peer",
    "hiveengine.transport.runtime.Runtime.release_recv_base",
    "hiveengine.transport.runtime.Runtime.submit",
    "hiveengine.transport.runtime.Runtime.unregister_peer",
    "hiveengine.transport.stream.Chunk.discard",
}


def public_names(module) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    ]


def undocumented() -> set[str]:
    """Every public module, class, function, method and property (of a public class) without a docstring."""
    import importlib
    import inspect

    missing = set()
    for package in PACKAGES:
        module = importlib.import_module(package)
        if not (module.__doc__ or "").strip():
            missing.add(package)
        for name in public_names(module):
            obj = getattr(module, name)
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
                continue  # constants: documented by the page that names them
            if not (obj.__doc__ or "").strip():
                missing.add(f"{package}.{name}")
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                    if attr.startswith("_") or not inspect.isfunction(func):
                        continue
                    if not (func.__doc__ or "").strip():
                        missing.add(f"{obj.__module__}.{obj.__qualname__}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    """The API reference is generated from docstrings: a public name without one would be an empty entry."""
    assert undocumented() - UNDOCUMENTED == set()
