"""The split of work across ranks (no processes needed)."""

from __future__ import annotations

import random

from quantsave.distributed.group import balance


def test_balance_takes_the_largest_first() -> None:
    # In order, the last large item would land on an already loaded rank (loads 7 and 11).
    sizes = [5, 1, 1, 1, 5]
    owners = balance(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [6, 7]
    assert owners[0] != owners[4]  # the two large ones on different ranks


def test_balance_is_even_and_deterministic() -> None:
    rng = random.Random(0)
    for ranks in (2, 3, 5):
        sizes = [rng.choice([0, 64, 4096, 1 << 20, 3 << 20]) for _ in range(200)]
        owners = balance(sizes, ranks)
        assert owners == balance(list(sizes), ranks)
        assert set(owners) <= set(range(ranks))
        loads = [sum(max(s, 1) for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(ranks)]
        assert max(loads) - min(loads) <= max(sizes)
        if ranks == 2:  # enough small items to close the gap
            assert max(loads) - min(loads) <= 4096
    assert balance([], 3) == []
    assert balance([7, 7, 7], 3) == [0, 1, 2]  # equal sizes in order
