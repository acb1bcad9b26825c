"""The release workflow, checked offline: pinned actions, least privilege, the platforms it
builds, a smoke test for every wheel, publishing on tags only; and tools/smoke_wheel.py itself,
with torch and with torch blocked."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
SMOKE = ROOT / "tools" / "smoke_wheel.py"

# (runner, maturin target, manylinux) for every wheel; aarch64 Linux builds on native arm runners
# so that its wheel can be run. macos-13 was retired; macos-15-intel is GitHub's x86_64 image.
PLATFORMS = {
    "manylinux-x86_64": ("ubuntu-24.04", "x86_64", "2_28"),
    "manylinux-aarch64": ("ubuntu-24.04-arm", "aarch64", "2_28"),
    "musllinux-x86_64": ("ubuntu-24.04", "x86_64", "musllinux_1_2"),
    "musllinux-aarch64": ("ubuntu-24.04-arm", "aarch64", "musllinux_1_2"),
    "macos-arm64": ("macos-14", "aarch64", None),
    "macos-x86_64": ("macos-15-intel", "x86_64", None),
    "windows-x64": ("windows-2025", "x64", None),
}
# torch (>= 2.4) has no wheels for musllinux nor for macOS x86_64.
NO_TORCH = {"musllinux-x86_64", "musllinux-aarch64", "macos-x86_64"}
ACTIONS = {
    "actions/checkout",
    "actions/setup-python",
    "PyO3/maturin-action",
    "actions/upload-artifact",
    "actions/download-artifact",
    "pypa/gh-action-pypi-publish",
}
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")
PINNED = re.compile(r"^(?P<action>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{40})$")
VERSION_COMMENT = re.compile(r"^\s+# (?P<version>v\d+\.\d+\.\d+)$")
# Runs a script in an interpreter where `import torch` fails, as where torch has no wheels.
BLOCK_TORCH = """
import runpy, sys
class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"torch is blocked in this test: {name}", name=name)
        return None
sys.meta_path.insert(0, BlockTorch())
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    loaded = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def triggers(workflow: dict[Any, Any]) -> dict[str, Any]:
    # YAML 1.1 (PyYAML) reads the bare key `on` as the boolean True.
    on = workflow["on"] if "on" in workflow else workflow[True]
    assert isinstance(on, dict)
    return on


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if str(s.get("uses", "")).split("@")[0] == action]


def platforms(workflow: dict[Any, Any]) -> dict[str, dict[str, Any]]:
    entries = workflow["jobs"]["wheels"]["strategy"]["matrix"]["platform"]
    names = [p["name"] for p in entries]
    assert len(names) == len(set(names)), names
    return {p["name"]: p for p in entries}


def test_runs_on_version_tags_and_by_hand_only(workflow: dict[Any, Any]) -> None:
    on = triggers(workflow)
    assert set(on) == {"push", "workflow_dispatch"}
    assert on["push"] == {"tags": ["v*"]}


def test_every_action_is_pinned_to_a_commit_with_its_version(workflow: dict[Any, Any]) -> None:
    lines = [line for line in WORKFLOW.read_text(encoding="utf-8").splitlines() if USES_LINE.match(line)]
    parsed = [s["uses"] for job in workflow["jobs"].values() for s in steps(job) if "uses" in s]
    assert len(lines) == len(parsed), "every `uses:` is on a line of its own"
    versions: dict[str, set[str]] = {}
    for line in lines:
        m = USES_LINE.match(line)
        assert m is not None
        pin = PINNED.match(m["ref"])
        assert pin is not None, f"not pinned to a full commit SHA: {line.strip()}"
        comment = VERSION_COMMENT.match(m["rest"])
        assert comment is not None, f"no `# vX.Y.Z` after the SHA: {line.strip()}"
        versions.setdefault(m["ref"], set()).add(comment["version"])
    assert {ref.split("@")[0] for ref in versions} == ACTIONS
    for ref, seen in versions.items():
        assert len(seen) == 1, f"{ref} carries different version comments: {seen}"
    for action in ACTIONS:
        shas = {ref for ref in versions if ref.startswith(action + "@")}
        assert len(shas) == 1, f"{action} is pinned to several commits: {shas}"


def test_permissions_are_least_privilege(workflow: dict[Any, Any]) -> None:
    assert workflow["permissions"] in ({}, {"contents": "read"})
    jobs = workflow["jobs"]
    for name, job in jobs.items():
        assert "permissions" in job, f"job {name} states its permissions"
        granted = job["permissions"]
        if name == "publish":
            assert granted == {"id-token": "write"}
        else:
            assert granted == {"contents": "read"}, f"job {name}: {granted}"
    assert [n for n, j in jobs.items() if j["permissions"].get("id-token") == "write"] == ["publish"]
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "secrets." not in text, "trusted publishing needs no secret"
    for s in step_using(jobs["wheels"], "actions/checkout") + step_using(jobs["sdist"], "actions/checkout"):
        assert s["with"]["persist-credentials"] is False


def test_the_matrix_builds_exactly_the_release_platforms(workflow: dict[Any, Any]) -> None:
    found = {name: (p["runner"], p["target"], p.get("manylinux")) for name, p in platforms(workflow).items()}
    assert found == PLATFORMS
    job = workflow["jobs"]["wheels"]
    assert job["runs-on"] == "${{ matrix.platform.runner }}"
    assert job["strategy"]["fail-fast"] is False
    (build,) = step_using(job, "PyO3/maturin-action")
    assert build["with"]["target"] == "${{ matrix.platform.target }}"
    assert build["with"]["manylinux"] == "${{ matrix.platform.manylinux }}"
    assert build["with"]["args"] == "--release --out dist"
    assert build["with"].get("command", "build") == "build"
    (upload,) = step_using(job, "actions/upload-artifact")
    assert upload["with"]["name"] == "dist-wheel-${{ matrix.platform.name }}"
    assert upload["with"]["path"] == "dist/*.whl"


def smoke_steps(job: dict[str, Any]) -> dict[str, str]:
    """The smoke-test scripts by the ``matrix.platform.smoke`` value whose ``if:`` selects them."""
    found: dict[str, str] = {}
    for s in steps(job):
        if "smoke_wheel.py" in s.get("run", ""):
            m = re.fullmatch(r"matrix\.platform\.smoke == '([\w-]+)'", str(s.get("if", "")))
            assert m is not None, f"smoke step {s.get('name')} is not selected by matrix.platform.smoke"
            assert m[1] not in found
            found[m[1]] = s["run"]
    return found


def test_every_wheel_is_installed_and_smoke_tested_on_its_platform(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["wheels"]
    scripts = smoke_steps(job)
    build_at = next(i for i, s in enumerate(steps(job)) if "PyO3/maturin-action" in str(s.get("uses")))
    smoke_at = [i for i, s in enumerate(steps(job)) if "smoke_wheel.py" in s.get("run", "")]
    assert all(i > build_at for i in smoke_at)
    for name, p in platforms(workflow).items():
        script = scripts.get(p["smoke"])
        assert script is not None, f"{name}: no step runs tools/smoke_wheel.py for smoke={p['smoke']!r}"
        assert "--reject-under" in script, f"{name}: the smoke test must refuse the source checkout"
        if name in NO_TORCH:
            assert "--no-deps" in script and "--require-torch" not in script, name
        else:
            assert "--no-deps" not in script and "--require-torch" in script, name
            assert "--extra-index-url https://download.pytorch.org/whl/cpu" in script, name
        if name.startswith("musllinux"):
            assert "docker run" in script and "alpine" in script, f"{name}: run in a musl userland"
            assert "-w /tmp" in script
        else:
            assert 'cd "$RUNNER_TEMP"' in script, f"{name}: run outside the checkout"
    assert set(scripts) == {p["smoke"] for p in platforms(workflow).values()}


def test_the_sdist_is_built_and_installed(workflow: dict[Any, Any]) -> None:
    job = workflow["jobs"]["sdist"]
    (build,) = step_using(job, "PyO3/maturin-action")
    assert build["with"]["command"] == "sdist"
    assert build["with"]["args"] == "--out dist"
    assert any("smoke_wheel.py" in s.get("run", "") and "dist/*.tar.gz" in s["run"] for s in steps(job))
    (upload,) = step_using(job, "actions/upload-artifact")
    assert upload["with"]["name"] == "dist-sdist"


def test_publish_runs_on_tags_only_after_every_build(workflow: dict[Any, Any]) -> None:
    jobs = workflow["jobs"]
    publish = jobs["publish"]
    assert set(publish["needs"]) == set(jobs) - {"publish"}
    condition = publish["if"]
    assert "github.event_name == 'push'" in condition
    assert "startsWith(github.ref, 'refs/tags/v')" in condition
    assert " || " not in condition
    assert publish["environment"]["name"] == "pypi"
    (download,) = step_using(publish, "actions/download-artifact")
    assert download["with"] == {"pattern": "dist-*", "path": "dist", "merge-multiple": True}
    (upload,) = step_using(publish, "pypa/gh-action-pypi-publish")
    assert set(upload.get("with", {})) <= {"packages-dir", "attestations", "print-hash", "verbose"}
    assert all(
        "pypa/gh-action-pypi-publish" not in str(s.get("uses"))
        for j in jobs.values()
        if j is not publish
        for s in steps(j)
    )
    assert f"-eq {len(PLATFORMS)}" in "".join(s.get("run", "") for s in steps(publish))


def linter(name: str) -> str:
    """A console script of the `test` extra, beside this interpreter or on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found is not None, f"{name} is not installed: the test extra installs it (pip install -e '.[test]')"
    return found


@pytest.mark.parametrize(
    "command",
    [
        ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        ["zizmor", "--offline", "--persona=pedantic", str(WORKFLOW)],
    ],
    ids=["check-jsonschema", "zizmor"],
)
def test_linters_accept_the_workflow(command: list[str]) -> None:
    done = subprocess.run([linter(command[0]), *command[1:]], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def run_smoke(
    args: list[str], cwd: Path, *, block_torch: bool, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = [sys.executable, "-c", BLOCK_TORCH] if block_torch else [sys.executable]
    return subprocess.run(
        [*prefix, str(SMOKE), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.fixture(scope="module")
def installed_version() -> str:
    # Installed (wheel, sdist or editable): the tests run against an installed quantsave.
    return importlib.metadata.version("quantsave")


def test_smoke_with_torch_saves_and_loads(tmp_path: Path, installed_version: str) -> None:
    done = run_smoke(["--require-torch"], tmp_path, block_torch=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"smoke ok: quantsave {installed_version}" in done.stdout
    assert "save/load round trip" in done.stdout


def test_smoke_without_torch_loads_the_extension_alone(tmp_path: Path, installed_version: str) -> None:
    done = run_smoke([], tmp_path, block_torch=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"smoke ok: quantsave {installed_version}" in done.stdout
    assert "no torch" in done.stdout and "loaded alone" in done.stdout


def test_smoke_fails_when_torch_is_required_but_missing(tmp_path: Path, installed_version: str) -> None:
    done = run_smoke(["--require-torch"], tmp_path, block_torch=True)
    assert done.returncode == 1
    assert "torch cannot be imported" in done.stderr


def test_smoke_without_torch_never_runs_the_package_init(tmp_path: Path, installed_version: str) -> None:
    """An installed-looking copy: the extension file and an ``__init__`` that must not run."""
    from quantsave import _core

    site = tmp_path / "site"
    package = site / "quantsave"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('quantsave/__init__.py ran')\n", encoding="utf-8")
    shutil.copy2(_core.__file__, package / Path(_core.__file__).name)
    env = {**os.environ, "PYTHONPATH": str(site)}

    done = run_smoke(["--reject-under", str(ROOT)], tmp_path, block_torch=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"from {package.resolve()}" in done.stdout

    refused = run_smoke(["--reject-under", str(site)], tmp_path, block_torch=True, env=env)
    assert refused.returncode == 1
    assert "not the installed wheel" in refused.stderr
