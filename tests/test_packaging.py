"""Release hygiene: one version (Cargo.toml) everywhere, typing markers shipped with the
package, a changelog entry for the version."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import quantsave
from quantsave import _core

ROOT = Path(__file__).resolve().parents[1]


def cargo_version() -> str:
    return str(tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))["package"]["version"])


def test_one_version_everywhere() -> None:
    version = cargo_version()
    assert quantsave.__version__ == version
    assert _core.__version__ == version
    assert importlib.metadata.version("quantsave") == version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"], "the version comes from Cargo.toml only"


def test_typing_markers_ship_with_the_package() -> None:
    package = Path(quantsave.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_core.pyi").is_file()
    assert Path(_core.__file__).parent == package


def test_changelog_has_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{cargo_version()}]" in text


def test_license_is_apache() -> None:
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))["package"]["license"] == "Apache-2.0"


def test_checkpoint_error_pickles_across_processes() -> None:
    # multiprocessing and concurrent.futures pickle exceptions by their module path
    import pickle

    assert quantsave.CheckpointError.__module__ == "quantsave._core"
    again = pickle.loads(pickle.dumps(quantsave.CheckpointError("invalid checkpoint file x: truncated")))
    assert type(again) is quantsave.CheckpointError and str(again) == "invalid checkpoint file x: truncated"
