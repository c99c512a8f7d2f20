"""The package installs as documented: kernels/ becomes animatediff_lite.kernels, assets ship as package data."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_package_imports_kernels_from_the_kernels_folder():
    import animatediff_lite.kernels as kernels

    assert Path(kernels.__file__).resolve().parent == ROOT / "kernels"


def test_wheel_contains_kernels_and_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("animatediff_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert {f"animatediff_lite/kernels/{n}" for n in kernel_files} <= names
    assert "animatediff_lite/assets/bpe_simple_vocab_16e6.txt.gz" in names
    assert "animatediff_lite/assets/presets.toml" in names
    assert "animatediff_lite/kernels/verified.toml" in names  # backend="auto" reads it
    assert not any(n.startswith("kernels/") for n in names)  # no top-level "kernels" package (a PyPI name clash)
    # The wheel imports on its own: unpack it and import the kernels package from there.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "import animatediff_lite.kernels as k, animatediff_lite as ad; print(k.__file__); print(ad.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout
