"""The ranks of one save or convert: which process group, who owns what, and the few
collectives that keep the ranks in step (all through ``torch.distributed``; quantsave has no
transport of its own).

Every step that can fail on one rank runs through ``Ranks.step``: each rank runs it, then all
ranks exchange the outcome, so a failure anywhere becomes an error on every rank naming the rank
that failed, and no rank goes on to a collective the others will never reach. The exchanges run
on a gloo group of the same ranks with quantsave's own timeout, so a rank that dies or stalls
becomes a ``DistributedError`` within that timeout instead of a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from quantsave.errors import DistributedError

__all__ = ["DEFAULT_TIMEOUT", "Ranks", "active_group", "balance", "digest"]

T = TypeVar("T")

#: Seconds a rank waits for the others at each exchange (``QUANTSAVE_DIST_TIMEOUT`` overrides).
DEFAULT_TIMEOUT = 600.0


def active_group(process_group: Any) -> Any:
    """The process group a save runs on: ``process_group``, or the default group when
    ``torch.distributed`` is initialized with more than one rank; None for a one-process save.

    Raises:
        ValueError: ``process_group`` is given but ``torch.distributed`` is not initialized.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group= needs an initialized torch.distributed (init_process_group)")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (what the ranks compare)."""
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def balance(sizes: list[int], ranks: int) -> list[int]:
    """The owner rank of each item: the largest first, each to the least loaded rank so far
    (by bytes; ties to the lowest rank, equal sizes in order). No two loads differ by more
    than the item last given to the larger, and the small items, placed last, even them out;
    the same answer on every rank."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = min(range(ranks), key=lambda k: (load[k], k))
        owners[i] = r
        load[r] += max(sizes[i], 1)
    return owners


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = open(f"/proc/{pid}/stat", encoding="ascii").read()  # noqa: SIM115 - one read
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


class Ranks:
    """The ranks of ``group`` for one operation (``what``: ``"save"`` or ``"convert"``)."""

    def __init__(self, group: Any, what: str, timeout: float | None = None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.control: Any = None
        self.what = what
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if timeout is None:
            timeout = float(os.environ.get("QUANTSAVE_DIST_TIMEOUT", DEFAULT_TIMEOUT))
        self.timeout = timeout
        ranks = dist.get_process_group_ranks(group)
        try:
            # Only the group's own ranks take part in making it.
            self.control = dist.new_group(
                ranks, backend="gloo", timeout=timedelta(seconds=timeout), use_local_synchronization=True
            )
        except Exception as e:  # torch raises several types when a rank is missing
            raise DistributedError(
                f"quantsave {what}: not every one of the group's {len(ranks)} ranks started the {what} within "
                f"{timeout:g} s (every rank must make the same call; QUANTSAVE_DIST_TIMEOUT sets the wait): "
                f"{type(e).__name__}: {e}"
            ) from e
        self.peers: list[tuple[str, int]] = []
        self.peers = self.gather((socket.gethostname(), os.getpid()), "the start")

    def close(self) -> None:
        try:
            self.dist.destroy_process_group(self.control)
        except Exception:  # noqa: BLE001 - a broken group cannot always be torn down; nothing to do
            pass

    # --- exchanges -------------------------------------------------------------------------

    def _lost(self, during: str, e: BaseException) -> DistributedError:
        host = socket.gethostname()
        dead = [r for r, (h, pid) in enumerate(self.peers) if h == host and r != self.rank and not _alive(pid)]
        who = f"rank(s) {dead} exited" if dead else "a rank exited"
        return DistributedError(
            f"quantsave {self.what}: the {self.size} ranks lost contact during {during} ({who}, or a rank did "
            f"not answer within {self.timeout:g} s: QUANTSAVE_DIST_TIMEOUT): {type(e).__name__}: {e}. "
            "Nothing was committed."
        )

    def gather(self, value: Any, during: str, *, outcome: bool = False) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank. Each value travels with the
        step it belongs to, so ranks that got out of step (one failed before an exchange the
        others are in) raise instead of taking each other's values; a rank that reported a
        failure is named."""
        out: list[Any] = [None] * self.size
        try:
            self.dist.all_gather_object(out, (during, outcome, value), group=self.control)
        except Exception as e:  # gloo reports a dead or slow peer as several types
            raise self._lost(during, e) from e
        if all(label == during and kind == outcome for label, kind, _ in out):
            return [v for _, _, v in out]
        for r, (label, kind, v) in enumerate(out):
            if kind and v is not None:
                raise DistributedError(f"quantsave {self.what}: rank {r} failed during {label}: {v}")
        steps = "; ".join(f"rank {r}: {label}" for r, (label, _, _) in enumerate(out))
        raise DistributedError(f"quantsave {self.what}: the ranks are out of step ({steps}). Nothing was committed.")

    def broadcast(self, value: Any, during: str, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` (a group rank) on every rank."""
        box = [(during, value)]
        try:
            self.dist.broadcast_object_list(box, src=self.dist.get_global_rank(self.group, src), group=self.control)
        except Exception as e:  # as in gather
            raise self._lost(during, e) from e
        label, got = box[0]
        if label != during:
            raise DistributedError(
                f"quantsave {self.what}: the ranks are out of step (rank {src}: {label}; rank {self.rank}: {during})"
            )
        return got

    def step(self, fn: Callable[[], T], during: str) -> T:
        """Runs ``fn`` on this rank, then checks every rank succeeded: a failure on this rank is
        re-raised here (noted with the rank), a failure elsewhere raises ``DistributedError``
        naming that rank; either way on every rank."""
        error: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except DistributedError:
            # From an exchange inside ``fn``: the other ranks learned of it there too.
            raise
        except Exception as e:  # noqa: BLE001 - reported to every rank, then re-raised
            error = e
        self.check(error, during)
        return result  # type: ignore[no-any-return]

    def check(self, error: BaseException | None, during: str) -> None:
        """Exchanges this rank's outcome (``error`` or None) and raises as ``step`` does."""
        summary = None if error is None else f"{type(error).__name__}: {error}"
        try:
            outcomes = self.gather(summary, during, outcome=True)
        except DistributedError:
            if error is None:
                raise
            outcomes = [summary]
        failed = [(r, s) for r, s in enumerate(outcomes) if s is not None]
        if not failed:
            return
        if error is not None:
            error.add_note(f"quantsave {self.what}: raised on rank {self.rank} of {self.size} during {during}")
            raise error
        r, s = failed[0]
        others = f" (and rank(s) {[f for f, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise DistributedError(f"quantsave {self.what}: rank {r}{others} failed during {during}: {s}")

    def agree(self, fields: dict[str, Any], what: str) -> None:
        """Checks every rank passed the same ``fields`` (compared by digest); the error names the
        ranks that differ from rank 0 and the fields."""
        mine = {k: digest(v) for k, v in fields.items()}
        every = self.gather(mine, f"the check of {what}")
        bad = {r: sorted(k for k in mine if theirs.get(k) != every[0].get(k)) for r, theirs in enumerate(every)}
        bad = {r: ks for r, ks in bad.items() if ks}
        if bad:
            detail = "; ".join(f"rank {r}: {', '.join(ks)}" for r, ks in sorted(bad.items()))
            raise DistributedError(
                f"quantsave {self.what}: the ranks passed different {what} (every rank must make the same "
                f"call): differs from rank 0 on {detail}. Nothing was written."
            )

    @contextmanager
    def collective(self, during: str) -> Iterator[None]:
        """Turns a failure of a data collective (``DTensor.full_tensor``) into a ``DistributedError``."""
        try:
            yield
        except Exception as e:  # as in gather
            raise self._lost(during, e) from e
