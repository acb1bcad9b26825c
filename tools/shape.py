"""Prints the package's shape: module sizes (largest, median), functions over 80 lines, and
blocks of six or more lines that repeat in library code (exact after stripping indentation and
comments; blank lines and lines of only brackets ignored).

Usage: python tools/shape.py [PACKAGE_DIR]   (default: python/quantsave)
"""

from __future__ import annotations

import ast
import statistics
import sys
from collections import defaultdict
from pathlib import Path

WINDOW = 6
MAX_FUNCTION = 80


def _lines(path: Path) -> list[tuple[int, str]]:
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith(("'", '"')) else raw.strip()
        if line and line.strip("()[]{},:") and not line.startswith(("import ", "from ", '"""')):
            out.append((n, line))
    return out


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (f"{path}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
    ]


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "python/quantsave")
    modules = sorted(p for p in root.rglob("*.py"))
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in modules}
    largest = max(sizes, key=sizes.__getitem__)
    print(f"modules: {len(modules)}; largest {sizes[largest]} lines ({largest}); "
          f"median {statistics.median(sizes.values()):.0f}; over 600: {sum(v > 600 for v in sizes.values())}")
    long = sorted((f for p in modules for f in _functions(p) if f[1] > MAX_FUNCTION), key=lambda f: -f[1])
    print(f"functions over {MAX_FUNCTION} lines: {len(long)}")
    for name, n in long:
        print(f"  {n:4d}  {name}")
    seen: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for p in modules:
        lines = _lines(p)
        for i in range(len(lines) - WINDOW + 1):
            window = tuple(text for _, text in lines[i : i + WINDOW])
            seen[window].append(f"{p}:{lines[i][0]}")
    repeats = {w: where for w, where in seen.items() if len(where) > 1}
    print(f"repeated blocks of {WINDOW}+ lines: {len(repeats)}")
    for where in list(repeats.values())[:20]:
        print("  " + "  ==  ".join(where))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
