"""Starts the rank processes of a distributed test (``torch.multiprocessing``, spawn, gloo)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, scenarios: list[str], out: Path, *, env: dict[str, str] | None = None,
           timeout: float = 600) -> list[int | None]:  # fmt: skip
    """Runs ``workers.run`` on ``world`` ranks; returns each rank's exit code (None: killed at
    ``timeout``)."""
    import workers

    ctx = mp.get_context("spawn")
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        port = free_port()
        procs = [ctx.Process(target=workers.run, args=(r, world, port, scenarios, str(out))) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(old)
    codes: list[int | None] = []
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def outcome(out: Path, scenario: str, rank: int) -> dict[str, Any]:
    path = out / f"{scenario}.rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else {"ok": False, "missing": True}
