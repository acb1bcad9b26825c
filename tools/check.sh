#!/usr/bin/env bash
# Every check, as CI runs it (.ci/run runs exactly this script): Rust lint and tests, the wheel
# and the sdist built and installed into a fresh virtual environment, Python lint and types
# against the installed package, then the whole pytest suite against the installed wheel (not
# the source tree).
#
# Needs Python 3.11+ with pip, maturin and a Rust toolchain (rustfmt, clippy). Network access to
# PyPI for the test dependencies. VENV (default .venv-check) is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-check}
PYTHON=${PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

# Each step prints the seconds since the start, so a slow run shows where its time went.
step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }

step "rust: format, lint, the core without PyO3, tests"
cargo fmt --check
cargo clippy --locked --all-targets --features python -- -D warnings
cargo clippy --locked --all-targets --no-default-features -- -D warnings
cargo check --locked --lib --no-default-features
if cargo tree --locked --no-default-features --edges normal --prefix none | grep -q '^pyo3 '; then
    echo "the core crate (no features) depends on pyo3" >&2
    exit 1
fi
cargo test --locked

step "rust: the release targets compile (checked, not linked: no cross toolchains here)"
TARGETS="x86_64-pc-windows-msvc x86_64-apple-darwin aarch64-apple-darwin aarch64-unknown-linux-gnu x86_64-unknown-linux-musl"
rustup target add $TARGETS
for target in $TARGETS; do
    PYO3_CROSS_PYTHON_VERSION=3.11 cargo clippy --locked --lib --features python --target "$target" -- -D warnings
done

step "build: abi3 wheel and sdist"
rm -rf dist
maturin build --release --locked --out dist
maturin sdist --out dist
ls -l dist

step "fresh virtual environment: the sdist builds and installs, with the test dependencies"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
VPY="$PWD/$VENV/bin/python"
# Everything below runs as inside the activated venv: its bin/ first on PATH, so tools that look
# for executables there find the venv's own (torch's C++ extension builder needs `ninja`, which
# optimum-quanto installs, to compile quanto's CPU kernels). Compiled extensions go into the venv
# too, so no earlier run's ~/.cache/torch_extensions can hide a missing build step.
export VIRTUAL_ENV="$PWD/$VENV"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="$VIRTUAL_ENV/torch_extensions"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "$(ls dist/quantsave-*.tar.gz)[test,lint]"
(cd "$VENV" && "$VPY" "$OLDPWD/tools/smoke_wheel.py")

step "the wheel replaces it; everything below runs against the installed wheel"
"$VPY" -m pip install -q --no-deps --force-reinstall "$(ls dist/quantsave-*.whl)"
(cd "$VENV" && "$VPY" "$OLDPWD/tools/smoke_wheel.py")
# (tests/test_packaging.py checks the version; this only checks which copy gets imported.)
"$VPY" -c 'import pathlib, quantsave; where = pathlib.Path(quantsave.__file__).resolve(); assert "site-packages" in where.parts, where; print("quantsave", quantsave.__version__, "from", where.parent)'

step "python: lint, strict types, the extension's stub against the built module"
"$VENV/bin/ruff" check python tests benches tools
"$VENV/bin/mypy"
(cd "$VENV" && "$VPY" -m mypy.stubtest quantsave._core)

step "release workflow: schema and security lint (offline)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/release.yml
"$VENV/bin/zizmor" --offline --persona=pedantic .github/workflows/release.yml

step "pytest against the installed wheel"
"$VPY" -m pytest -q --durations=15
step "done"
