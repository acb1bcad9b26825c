"""Checkpoint-level atomic commits: a save writes into a staging folder beside the target and
swaps it into place with one atomic exchange, so readers see the old checkpoint or the new one,
never a mix, whenever the saving process stops.

    with staged_directory(target) as stage:
        ...write every file into stage...

1. ``stage`` is a fresh sibling ``.<name>.quantsave-<pid>-<token>.tmp``, locked (``flock``) for
   as long as the save runs; the files of an existing ``target`` are hard-linked into it first
   (the old files are never modified: every write replaces a link with a new file by rename), so
   whatever the save does not rewrite carries over.
2. On success the stage and the target are exchanged (``renameat2(RENAME_EXCHANGE)``, one atomic
   step). Entries that other programs created in the old folder meanwhile are moved across, then
   the old folder is deleted. Where the filesystem cannot exchange, two renames are used (a
   moment without the folder; a save interrupted there is repaired by the next one).
3. On error the stage is deleted and the target is untouched. A process killed before the
   exchange leaves only the staging sibling, which loaders never look at and the next save into
   the same target deletes (a stage is stale when nobody holds its lock).

Concurrent saves into one target each commit a complete checkpoint; the last exchange wins.
Where the parent folder is not writable but an existing target is, or the target is (or holds)
a mount point, which cannot be renamed, the files are written in place instead (each replaced
atomically by rename, the checkpoint as a whole not).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from quantsave import _core
from quantsave.checkpoint.names import is_temp_name

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["fsync_enabled", "staged_directory", "stale_stages"]


def fsync_enabled() -> bool:
    """Whether saves fsync files and folders (``QUANTSAVE_FSYNC=1``); off by default, as in the references."""
    return os.environ.get("QUANTSAVE_FSYNC", "0").strip().lower() not in ("", "0", "false", "no")


def _stage_name(target: Path, kind: str = "") -> str:
    return f".{target.name}.quantsave-{kind}{os.getpid()}-{os.urandom(6).hex()}.tmp"


def _pattern(target: Path, kind: str = "") -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.quantsave-{kind}\d+-[0-9a-f]+\.tmp$")


def _lock(folder: Path) -> int | None:
    """An exclusive lock held on ``folder`` (its descriptor), or None where locks are missing."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _abandoned(stage: Path) -> bool:
    """Whether no running save holds ``stage`` (its lock is free; without locks: a day old)."""
    if fcntl is None:
        try:
            return time.time() - stage.stat().st_mtime > 24 * 3600
        except OSError:
            return False
    try:
        fd = _lock(stage)
    except OSError:
        return False
    _unlock(fd)
    return True


def stale_stages(target: Path) -> list[Path]:
    """Staging siblings of ``target`` that no running save holds."""
    pattern = _pattern(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    return [e for e in entries if pattern.match(e.name) and e.is_dir() and not e.is_symlink() and _abandoned(e)]


def _link_tree(src: Path, dst: Path, seen: set[str], skip: Collection[str] = (), prefix: str = "") -> None:
    """Recreates ``src``'s files in ``dst`` as hard links (copies where linking fails), leaving
    out temporaries of interrupted writes and the files named in ``skip`` (relative paths), and
    records every entry's relative path in ``seen``; folder attributes are copied last, so a
    read-only folder is still filled."""
    for entry in src.iterdir():
        if is_temp_name(entry.name):
            continue
        rel = prefix + entry.name
        seen.add(rel)
        target = dst / entry.name
        if rel in skip and entry.is_file() and not entry.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            target.mkdir()
            _link_tree(entry, target, seen, skip, rel + "/")
            shutil.copystat(entry, target)
        elif entry.is_file():
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)


def _mount_points() -> list[str] | None:
    """Every mount point of this process (Linux ``/proc/self/mountinfo``, bind mounts included),
    or None where the system does not list them."""
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    points = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            # Octal escapes (\040 for a space) as the kernel writes them.
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return points


def _holds_mount(folder: Path) -> bool:
    """Whether ``folder`` is, or contains, a mount point (which renames cannot move)."""
    if os.path.ismount(folder):
        return True
    points = _mount_points()
    if points is not None:
        real = os.path.realpath(folder)
        return any(p == real or p.startswith(real.rstrip("/") + "/") for p in points)
    for root, dirs, _files in os.walk(folder):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p) and os.path.ismount(p):
                return True
    return False


def _repair(target: Path) -> None:
    """Puts back an old folder a save moved aside and could not replace (killed between its two
    renames), so it is never taken for a stale stage."""
    if target.exists():
        return
    pattern = _pattern(target, "old-")
    try:
        candidates = sorted(
            (e for e in target.parent.iterdir() if pattern.match(e.name) and e.is_dir()),
            key=lambda e: e.stat().st_mtime,
            reverse=True,
        )
    except OSError:
        return
    for entry in candidates:
        if _abandoned(entry):
            try:
                os.rename(entry, target)
            except OSError:
                continue
            return


@contextmanager
def staged_directory(
    target: str | os.PathLike[str], *, fsync: bool = False, rewritten: Collection[str] = ()
) -> Iterator[Path]:
    """Yields the folder to write the checkpoint into; commits it as ``target`` atomically when
    the block ends without an error (see the module docstring). ``rewritten``: files (paths
    relative to the folder) the save writes anew, not linked from the old folder into the
    stage: a new file renamed over a link makes ext4 flush all of it to the disk on the spot
    (``auto_da_alloc``), which the background writeback would otherwise do.

    Raises:
        NotADirectoryError: ``target`` exists and is not a folder.
        ValueError: ``target`` names no folder of its own (``/``).
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    if not target.name:
        raise ValueError(f"cannot save into {str(target)!r}: name a folder")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_directory {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _repair(target)
    for old in stale_stages(target):
        shutil.rmtree(old, ignore_errors=True)
    if target.is_dir() and _holds_mount(target):
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
    lock = _lock(stage)
    committed = False
    seen: set[str] = set()
    try:
        try:
            if target.is_dir():
                _link_tree(target, stage, seen, frozenset(rewritten))
            yield stage
            if target.is_dir():
                shutil.copystat(target, stage)
            _commit(stage, target, fsync, seen)
        except OSError as e:
            # Name the target, not the staging folder, in what the caller sees.
            renamed = _renamed(e, stage, target)
            if renamed is e:
                raise
            raise renamed from e
        committed = True
    finally:
        _unlock(lock)
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
    except Exception:  # noqa: BLE001 - an OSError subclass with another constructor: keep it as it is
        return e


def _carry_late(old: Path, new: Path, seen: set[str], prefix: str = "") -> None:
    """Moves entries other programs created in the old folder during the save (not in
    ``seen``, the entries it had when the stage was filled) into the new one; what both have,
    the new folder's version wins. An old folder already gone (removed by a concurrent save's
    cleanup, see ``_commit``) has nothing left to carry."""
    try:
        entries = list(old.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        rel = prefix + entry.name
        dest = new / entry.name
        if is_temp_name(entry.name):
            continue
        if rel not in seen:
            if not os.path.lexists(dest):
                try:
                    os.rename(entry, dest)
                except OSError:
                    pass
        elif entry.is_dir() and not entry.is_symlink() and dest.is_dir() and not dest.is_symlink():
            _carry_late(entry, dest, seen, rel + "/")


def _commit(stage: Path, target: Path, fsync: bool, seen: set[str]) -> None:
    if fsync:
        # The files were fsynced as they were written; make the folder entries durable too.
        for folder, _dirs, _files in os.walk(stage):
            _core.fsync_dir(Path(folder))
    while True:
        if not target.exists():
            try:
                os.rename(stage, target)
                break
            except OSError:
                if not target.exists():
                    raise
                # Created meanwhile by another save: exchange with it instead.
        # The old folder is locked before the exchange gives it the stage's name, so a
        # concurrent save does not take it for an abandoned stage and delete it while its
        # late entries are carried over (where another save holds it, that save's own lock does).
        try:
            old_lock = _lock(target)
        except OSError:
            old_lock = None
        try:
            if _core.exchange_paths(str(stage), str(target)):
                # ``stage`` now names the old folder.
                _carry_late(stage, target, seen)
                shutil.rmtree(stage, ignore_errors=True)
                break
        finally:
            _unlock(old_lock)
        # No atomic exchange here: move the old folder aside (under a name the next save
        # restores should this process die now), then the new one in.
        aside = target.parent / _stage_name(target, "old-")
        os.rename(target, aside)
        try:
            os.rename(stage, target)
        except OSError:
            os.rename(aside, target)
            raise
        _carry_late(aside, target, seen)
        shutil.rmtree(aside, ignore_errors=True)
        break
    if fsync:
        try:
            _core.fsync_dir(target.parent)
        except OSError:
            pass  # committed already; durability of the rename is best effort here
