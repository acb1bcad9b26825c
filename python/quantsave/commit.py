"""Checkpoint-level atomic commits: a save writes into a staging folder beside the target and
swaps it into place with one atomic exchange, so readers see the old checkpoint or the new one,
never a mix, whenever the saving process stops.

    with staged_directory(target) as stage:
        ...write every file into stage...

1. ``stage`` is a fresh sibling ``.<name>.quantsave-<pid>-<n>.tmp``; the files of an existing
   ``target`` are hard-linked into it first (the old files are never modified: every write
   replaces a link with a new file by rename), so whatever the save does not rewrite carries over.
2. On success the stage and the target are exchanged (``renameat2(RENAME_EXCHANGE)``, one atomic
   step); the old folder, now at the staging name, is deleted. Where the filesystem cannot
   exchange, two renames are used (a moment without the folder).
3. On error the stage is deleted and the target is untouched. A process killed before the
   exchange leaves only the staging sibling, which loaders never look at and the next save into
   the same target deletes.

Concurrent saves into one target each commit a complete checkpoint; the last exchange wins.
Where the parent folder is not writable but an existing target is, or the target is a mount
point (which cannot be renamed), the files are written in place (each replaced atomically by rename, the
checkpoint as a whole not).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantsave import _core

__all__ = ["staged_directory", "stale_stages"]

_COUNTER = itertools.count()


def _stage_name(target: Path) -> str:
    return f".{target.name}.quantsave-{os.getpid()}-{next(_COUNTER)}.tmp"


def stale_stages(target: Path) -> list[Path]:
    """Staging siblings of ``target`` left by processes that no longer run."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.quantsave-(\d+)-\d+\.tmp$")
    out = []
    parent = target.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return out
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m[1])
        if pid != os.getpid() and not _alive(pid, entry):
            out.append(entry)
    return out


def _alive(pid: int, stage: Path) -> bool:
    """Whether the process that made ``stage`` may still be writing it."""
    if os.name != "posix":
        # No harmless liveness probe here (os.kill terminates on Windows): go by age.
        try:
            return time.time() - stage.stat().st_mtime < 24 * 3600
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Per-file temporaries of quantsave's writers (``.<name>.<pid>-<n>.quantsave.tmp``).
_FILE_TEMP = re.compile(r"^\..+\.\d+-\d+\.quantsave\.tmp$")


def _link_tree(src: Path, dst: Path) -> None:
    """Recreates ``src``'s files in ``dst`` as hard links (copies where linking fails), leaving
    out temporaries of interrupted writes."""
    for entry in src.iterdir():
        if _FILE_TEMP.match(entry.name):
            continue
        target = dst / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            target.mkdir()
            shutil.copystat(entry, target)
            _link_tree(entry, target)
        elif entry.is_file():
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)


@contextmanager
def staged_directory(target: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yields the folder to write the checkpoint into; commits it as ``target`` atomically when
    the block ends without an error (see the module docstring).

    Raises:
        NotADirectoryError: ``target`` exists and is not a folder.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_directory {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    for old in stale_stages(target):
        shutil.rmtree(old, ignore_errors=True)
    if target.is_dir() and os.path.ismount(target):
        # A mount point cannot be renamed or exchanged: write in place.
        yield target
        return
    stage = target.parent / _stage_name(target)
    try:
        stage.mkdir()
    except PermissionError as e:
        if target.is_dir() and os.access(target, os.W_OK | os.X_OK):
            # The folder is writable but its parent is not: no room for a staging sibling, so
            # write in place (each file still replaced atomically, the checkpoint as a whole not).
            yield target
            return
        raise PermissionError(e.errno, f"cannot write the checkpoint folder {target}: {e.strerror}", str(target)) from e
    committed = False
    try:
        if target.is_dir():
            shutil.copystat(target, stage)
            _link_tree(target, stage)
        try:
            yield stage
            _commit(stage, target, fsync)
        except OSError as e:
            # Name the target, not the staging folder, in what the caller sees.
            renamed = _renamed(e, stage, target)
            if renamed is e:
                raise
            raise renamed from e
        committed = True
    finally:
        if not committed:
            shutil.rmtree(stage, ignore_errors=True)


def _renamed(e: OSError, stage: Path, target: Path) -> OSError:
    """``e`` with the staging folder's path replaced by the target's (same type and errno)."""
    old, new = str(stage), str(target)
    if old not in str(e):
        return e
    message = (e.strerror or str(e)).replace(old, new)
    filename = e.filename.replace(old, new) if isinstance(e.filename, str) else e.filename
    try:
        return type(e)(message) if e.errno is None else type(e)(e.errno, message, filename)
    except Exception:  # an OSError subclass with another constructor: keep it as it is
        return e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(stage: Path, target: Path, fsync: bool) -> None:
    if fsync:
        # The files were fsynced as they were written; make the folder entries durable too.
        for folder, _dirs, _files in os.walk(stage):
            _fsync_dir(Path(folder))
    while True:
        if not target.exists():
            try:
                os.rename(stage, target)
                break
            except OSError:
                if not target.exists():
                    raise
                # Created meanwhile by another save: exchange with it instead.
        if _core.exchange_paths(str(stage), str(target)):
            # ``stage`` now names the old folder.
            shutil.rmtree(stage, ignore_errors=True)
            break
        # No atomic exchange here: move the old folder aside, then the new one in.
        aside = target.parent / _stage_name(target)
        os.rename(target, aside)
        os.rename(stage, target)
        shutil.rmtree(aside, ignore_errors=True)
        break
    if fsync:
        _fsync_dir(target.parent)
