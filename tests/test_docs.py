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
