"""The wheel ships every module under the distill namespace, callbacks/ as distill.callbacks, every
file of distill/assets, no stray top-level package, and no module that shadows the standard library."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import ROOT


def test_wheel_holds_every_module_under_the_distill_namespace_only(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("distill", "callbacks"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*build, "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("distill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"distill", "distill-0.1.0.dist-info"}
    modules = {f"distill/{p.relative_to(ROOT / 'distill')}" for p in (ROOT / "distill").rglob("*.py")}
    modules |= {f"distill/callbacks/{p.name}" for p in (ROOT / "callbacks").glob("*.py")}
    assert modules <= names, sorted(modules - names)
    # the tracked files only: a run writes a hash memo (.distill_hash.json, git-ignored) beside the teacher
    tracked = subprocess.run(
        ["git", "ls-files", "distill/assets"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    assets = set(tracked.stdout.splitlines())
    assert assets <= names, sorted(assets - names)  # the demo data and both tokenizers ship
    stdlib = set(sys.stdlib_module_names)
    shadowing = [n for n in names if n.endswith(".py") and Path(n).stem in stdlib]
    assert not shadowing, shadowing
