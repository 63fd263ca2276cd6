"""The package installs where pybind11 is absent, as on the GPU machine (no network, no pybind11, so no build
isolation: ``pip install --no-deps --no-build-isolation -e .``): setup.py needs pybind11 only to compile the
optional epilogues, never to build the metadata. Without it each extension is skipped with one warning line,
unless ``ALPHADPO_REQUIRE_EXTENSIONS=1`` (CI), which fails the build loudly.

Each build runs on a copy of the files setup.py reads (nothing is written into the checkout), with a
``pybind11`` package first on ``PYTHONPATH`` whose import raises ImportError. ``ALPHADPO_BUILD_CUDA=1`` puts
the CUDA extension in the list too (and spares setup.py its torch import), so both are skipped. The whole
``gpu_check.sh`` in a venv holding only what the GPU machine has is .ci/gpu_like_dryrun.sh's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = ("alphadpo_kernels._C", "alphadpo_kernels._C_cuda")

pytest.importorskip("setuptools")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in ("csrc", "alphadpo_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    return src


def _env(tmp_path: Path, require: bool) -> dict[str, str]:
    shim = tmp_path / "no_pybind11" / "pybind11"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text('raise ImportError("pybind11 hidden by tests/test_install.py")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), env.get("PYTHONPATH")]))
    env["ALPHADPO_BUILD_CUDA"] = "1"
    env.pop("ALPHADPO_REQUIRE_EXTENSIONS", None)
    if require:
        env["ALPHADPO_REQUIRE_EXTENSIONS"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip_wheel(source: Path, tmp_path: Path, require: bool) -> tuple[subprocess.CompletedProcess, Path]:
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v",
           "--wheel-dir", str(dist), str(source)]
    proc = subprocess.run(cmd, env=_env(tmp_path, require), cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    return proc, dist


def test_pybind11_shim_hides_pybind11(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import pybind11"], env=_env(tmp_path, False),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "hidden by tests/test_install.py" in proc.stderr


def test_builds_without_pybind11_and_warns(source, tmp_path):
    proc, dist = _pip_wheel(source, tmp_path, require=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for ext in EXTENSIONS:
        lines = {line.strip() for line in log.splitlines() if f"optional extension {ext} not built" in line}
        assert len(lines) == 1, (ext, lines, log[-4000:])
        (line,) = lines
        assert "pybind11 is not installed" in line and "pure-Python backends still work" in line, line
    wheels = list(dist.glob("alphadpo_kernels-*.whl"))
    assert len(wheels) == 1, log[-4000:]
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "alphadpo_kernels/__init__.py" in names
    assert not [n for n in names if n.endswith(".so")], names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "Name: alphadpo_kernels" in zipfile.ZipFile(wheels[0]).read(metadata).decode()


def test_require_extensions_fails_loudly_without_pybind11(source, tmp_path):
    proc, dist = _pip_wheel(source, tmp_path, require=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-4000:]
    assert "ALPHADPO_REQUIRE_EXTENSIONS=1 but alphadpo_kernels._C cannot be built: pybind11 is not installed" in log, \
        log[-4000:]
    assert not list(dist.glob("*.whl"))


def test_editable_build_without_pybind11(source, tmp_path):
    """The GPU machine's command is an editable install: setuptools copies each built extension into the tree,
    which fails on one that was skipped unless it is marked optional."""
    out = tmp_path / "editable"
    out.mkdir()
    code = "import sys; from setuptools import build_meta; print('WHEEL', build_meta.build_editable(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=_env(tmp_path, False), cwd=source,
                          capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "WHEEL alphadpo_kernels-" in log and list(out.glob("alphadpo_kernels-*.whl")), log[-4000:]
    for ext in EXTENSIONS:
        assert f"warning: optional extension {ext} not built (pybind11 is not installed" in log, log[-4000:]
    assert not list(source.glob("alphadpo_kernels/*.so"))
