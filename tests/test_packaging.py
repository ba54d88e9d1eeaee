"""A non-editable install of megamm is complete: its own package data resolves a bare
`--ds_config` name, with no source checkout on the import path.

The checkout is copied (pip builds in the source folder: build/, *.egg-info) and installed,
offline, into a fresh venv: `pip install --no-deps --no-build-isolation --no-index`. That
venv sees torch, DeepSpeed, pip and setuptools through a .pth file listing the test
interpreter's site-packages: `venv --system-site-packages` would give the base interpreter's
instead when the tests run in a venv. A .pth line only appends its folder to sys.path (after
the fresh venv's own site-packages) and runs none of that folder's .pth files, so an
editable install of this checkout there stays inactive. Then the checkout's launch/train.py
runs by path from a folder outside the checkout: a script's sys.path starts with its own
folder (launch/), never the checkout root, so `megamm` comes from the fresh venv.
"""
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAUNCH = ROOT / "launch" / "train.py"
NOT_BUILT = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                   ".pytest_cache", "runs", ".whl")


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding a non-editable megamm, its site-packages, a folder
    outside the checkout, the environment to run in)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_BUILT)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    code, purelib, err = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env)
    assert code == 0, err
    purelib = Path(purelib.strip())
    (purelib / "test_interpreter_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code, out, err = _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--ignore-installed", "--no-cache-dir", "--disable-pip-version-check", src], tmp, env)
    assert code == 0, out[-3000:] + err[-3000:]
    outside = tmp / "elsewhere"
    outside.mkdir()
    return python, purelib, outside, env


def test_the_installed_copy_is_imported_and_holds_the_bundled_configs(installed):
    python, purelib, outside, env = installed
    # sys.path as when launch/train.py runs: its folder first, then the interpreter's
    probe = (f"import sys; sys.path[0] = {str(LAUNCH.parent)!r}\n"
             "import megamm\n"
             "from megamm.train import ds_config\n"
             "print(megamm.__file__)\n"
             "print(ds_config.resolve_path('zero3_offload.json'))\n")
    code, out, err = _run([python, "-c", probe], outside, env)
    assert code == 0, err
    module, config = (Path(line).resolve() for line in out.split())
    assert module == (purelib / "megamm" / "__init__.py").resolve()
    assert config == (purelib / "megamm" / "ds_configs" / "zero3_offload.json").resolve()
    assert (purelib / "megamm" / "kernels" / "rms_norm.py").is_file()
    assert not (purelib / "kernels").exists()  # never a top-level `kernels`: PyPI has one


def test_an_installed_megamm_resolves_a_bare_ds_config_name(installed):
    python, _, outside, env = installed
    code, out, err = _run([python, LAUNCH, "--ds_config", "zero3_offload.json", "--dry-run"], outside, env)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "parameters:" in out and "zero_stage=3" in out, out
