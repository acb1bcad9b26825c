"""Smoke test of an installed quantsave wheel; installs nothing.

Run from a folder outside the checkout, after ``pip install dist/*.whl``:

    python tools/smoke_wheel.py [--require-torch] [--reject-under CHECKOUT]

With torch importable, imports ``quantsave``, checks ``__version__`` against the installed
distribution's metadata and saves a small ``nn.Module`` with ``save_quantized``, then loads it
back into a fresh skeleton with ``load_quantized``. Without torch (musllinux and macOS x86_64 have
no torch wheels), loads the extension module file from the installed package folder without
running ``quantsave/__init__.py`` (which imports torch), checks its ``__version__`` and calls a
few pure functions of the Rust core. Exit status 0 and one ``smoke ok`` line on success.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import tempfile
from pathlib import Path
from types import ModuleType

DIST = "quantsave"


class SmokeError(RuntimeError):
    """The installed wheel does not behave as a release must."""


def package_dir() -> Path:
    """Returns the folder the import system would load ``quantsave`` from, importing nothing."""
    # A top-level name: find_spec imports no parent; it only asks the path finders.
    spec = importlib.util.find_spec(DIST)
    if spec is None or not spec.submodule_search_locations:
        raise SmokeError(f"no installed package named {DIST!r} on sys.path ({sys.path})")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def extension_path(folder: Path) -> Path:
    """Returns ``_core`` with the first suffix this interpreter accepts, in the import system's order."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"_core{suffix}"
        if candidate.is_file():
            return candidate
    found = sorted(p.name for p in folder.glob("_core*"))
    raise SmokeError(
        f"no loadable extension in {folder}: found {found}, "
        f"this interpreter loads {importlib.machinery.EXTENSION_SUFFIXES}"
    )


def load_extension(path: Path) -> ModuleType:
    """Loads ``quantsave._core`` from ``path`` alone, without the package's ``__init__``."""
    # The name's last part picks the init symbol (PyInit__core).
    spec = importlib.util.spec_from_file_location(f"{DIST}._core", path)
    if spec is None or spec.loader is None:
        raise SmokeError(f"{path} is not an extension module this interpreter can load")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_version(found: str) -> str:
    """Checks a module's ``__version__`` against the installed distribution's metadata."""
    expected = importlib.metadata.version(DIST)
    if found != expected:
        raise SmokeError(f"__version__ is {found!r} but the installed distribution is {expected!r}")
    return found


def check_core(core: ModuleType) -> None:
    """Calls pure functions of the Rust core on tiny inputs: sizes, an atomic write, sha256."""
    if core.parse_size("5GB") != 5_000_000_000:
        raise SmokeError(f"parse_size('5GB') returned {core.parse_size('5GB')}")
    names = core.shard_file_names("model.safetensors", None, 2)
    if names != ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]:
        raise SmokeError(f"shard_file_names returned {names}")
    data = b"quantsave smoke\n" * 64
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "blob.bin"
        core.write_bytes_atomic(target, data)
        if target.read_bytes() != data:
            raise SmokeError("write_bytes_atomic wrote different bytes")
        digests = core.sha256_files([target])
    if digests != [hashlib.sha256(data).hexdigest()]:
        raise SmokeError(f"sha256_files returned {digests}, hashlib {hashlib.sha256(data).hexdigest()}")


def check_round_trip() -> str:
    """Saves a small model with quantsave and loads it into a fresh skeleton; returns torch's version."""
    import torch
    from torch import nn

    import quantsave

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))

    model = build(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = quantsave.save_quantized(model, tmp)
        if not (Path(tmp) / "model.safetensors").is_file():
            raise SmokeError(f"save_quantized wrote {sorted(p.name for p in Path(tmp).iterdir())}")
        loaded = quantsave.load_quantized(tmp, build(1))
    want, got = model.state_dict(), loaded.state_dict()
    if want.keys() != got.keys() or not all(torch.equal(want[k], got[k]) for k in want):
        raise SmokeError(f"tensors differ after save/load ({result})")
    return str(torch.__version__)


def torch_importable() -> bool:
    """Whether ``import torch`` works here (a wheel install without deps leaves it out)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-torch", action="store_true", help="fail when torch cannot be imported")
    parser.add_argument(
        "--reject-under",
        type=Path,
        metavar="DIR",
        help="fail when quantsave would be imported from inside DIR (the source checkout)",
    )
    args = parser.parse_args(argv)

    folder = package_dir()
    if args.reject_under is not None and folder.is_relative_to(args.reject_under.resolve()):
        raise SmokeError(f"quantsave comes from {folder}, inside {args.reject_under}: not the installed wheel")
    has_torch = torch_importable()
    if args.require_torch and not has_torch:
        raise SmokeError("torch cannot be imported, and --require-torch was given")

    if has_torch:
        import quantsave
        from quantsave import _core as core

        if Path(quantsave.__file__).resolve().parent != folder:
            raise SmokeError(f"quantsave imported from {quantsave.__file__}, not from {folder}")
        check_version(quantsave.__version__)
    else:
        core = load_extension(extension_path(folder))
    version = check_version(core.__version__)
    check_core(core)
    if has_torch:
        mode = f"torch {check_round_trip()}: save/load round trip"
    else:
        mode = f"no torch: {Path(core.__file__).name} loaded alone"
    print(f"smoke ok: quantsave {version} from {folder} ({mode})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SmokeError as error:
        sys.exit(f"smoke FAILED: {error}")
