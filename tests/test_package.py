"""Packaging: `kernels/` and `csrc/` install as `fastrlhf.kernels` / `fastrlhf.csrc`, both from the
editable install the test command makes and from a built wheel."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_layout():
    visible = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] for line in tracked.stdout.splitlines() if not line.startswith(".")}
    assert top == {"pyproject.toml", "README.md", "fastrlhf", "kernels", "csrc", "tests", "bench"}, top
    assert top <= visible


def test_editable_install_maps_subpackages():
    import fastrlhf.csrc
    import fastrlhf.kernels

    assert Path(fastrlhf.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert Path(fastrlhf.csrc.__file__).resolve().parent == ROOT / "csrc"


@pytest.mark.slow
def test_wheel_contains_and_imports_subpackages(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheel_dir), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("fastrlhf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastrlhf/kernels/__init__.py" in names
    assert "fastrlhf/ops.py" in names and "fastrlhf/ref.py" in names
    assert "fastrlhf/integrations/trl.py" in names
    assert "fastrlhf/recipes/padula-arithmetic.yaml" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` module"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = ("import fastrlhf, fastrlhf.kernels, fastrlhf.csrc, os; "
            "print(os.path.dirname(fastrlhf.kernels.__file__)); "
            "print(sorted(os.listdir(os.path.dirname(fastrlhf.csrc.__file__))))")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    kernels_dir = out.splitlines()[0]
    assert Path(kernels_dir).resolve() == (site / "fastrlhf" / "kernels").resolve()
    suffixes = (".cpp", ".cu", ".cuh", ".h")
    csrc_sources = [n for n in names if n.startswith("fastrlhf/csrc/") and n.endswith(suffixes)]
    source_tree = [p for p in (ROOT / "csrc").iterdir() if p.suffix in suffixes]
    assert len(csrc_sources) == len(source_tree)


def test_imports_without_trl():
    """fastrlhf and its public API import with TRL absent; only the TRL integration needs it."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "import fastrlhf, fastrlhf.integrations\n"
            "try:\n    import fastrlhf.integrations.trl\nexcept ImportError as e:\n    print('refused', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused")
