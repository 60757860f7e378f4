"""install.py: the README's first command installs the CPU build of torch without an NVIDIA GPU, the
CUDA build with one, keeps an installed torch, and .ci/run runs exactly the README's test command.

The GPU branch is exercised with an ``nvidia-smi`` stand-in on PATH (this machine has no GPU); the
decisions are checked on the real script, as a dry run in a fresh interpreter without torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ngdiag_install", ROOT / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

WHEEL = "torch-{}-cp311-cp311-manylinux_2_28_x86_64.whl"


def _bash_blocks(text: str) -> list:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _plan(**facts):
    base = dict(want="auto", system="Linux", machine="x86_64", gpus=[], installed=None, spec=None, index_url=None,
                requirement="torch>=2.4", local_cpu=[])
    return install.plan_torch(**{**base, **facts})


# ----------------------------------------------------------------------------- the decisions
def test_no_gpu_takes_the_local_cpu_wheel_else_pytorchs_cpu_index():
    message, args = _plan(local_cpu=["2.13.0+cpu", "2.12.1+cpu"])
    assert args == ["torch==2.13.0+cpu"] and "no NVIDIA GPU" in message
    assert _plan()[1] == ["torch>=2.4", "--index-url", "https://download.pytorch.org/whl/cpu"]
    # a local CPU wheel that the project's requirement excludes is not taken
    assert _plan(local_cpu=["2.3.1+cpu"])[1] == ["torch>=2.4", "--index-url", install.CPU_INDEX_URL]
    assert _plan(local_cpu=["2.16.0+cpu", "2.13.0+cpu"], requirement="torch>=2.4,<2.15")[1] == ["torch==2.13.0+cpu"]
    assert _plan(index_url="https://mirror/cpu", local_cpu=["2.13.0+cpu"])[1] == ["torch>=2.4", "--index-url",
                                                                                   "https://mirror/cpu"]


def test_gpu_takes_the_default_cuda_build_and_overrides_win():
    message, args = _plan(gpus=["GPU 0: NVIDIA H200 (UUID: GPU-1)"], local_cpu=["2.13.0+cpu"])
    assert args == ["torch>=2.4"] and "1 NVIDIA GPU(s) found" in message
    assert _plan(want="cpu", gpus=["GPU 0: x"], local_cpu=["2.13.0+cpu"])[1] == ["torch==2.13.0+cpu"]
    assert _plan(want="cuda")[1] == ["torch>=2.4"]
    assert _plan(installed="2.13.0+cpu", gpus=["GPU 0: x"]) == ("torch 2.13.0+cpu is already installed: keeping it", None)
    assert _plan(spec="torch==2.14.1 torchvision==0.29.1", installed="2.13.0+cpu")[1] == ["torch==2.14.1",
                                                                                          "torchvision==0.29.1"]
    assert _plan(system="Darwin")[1] == ["torch>=2.4"]  # macOS wheels are CPU builds


def test_local_cpu_wheels_from_find_links_and_file_indexes(tmp_path):
    links = tmp_path / "wheels"
    links.mkdir()
    for name in (WHEEL.format("2.13.0+cpu"), WHEEL.format("2.14.1"), WHEEL.format("2.12.0+cpu").replace("cp311", "cp310"),
                 "torch-2.11.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl"):
        (links / name).write_bytes(b"")
    index = tmp_path / "simple" / "torch"
    index.mkdir(parents=True)
    (index / "index.html").write_text(f'<a href="../../files/{WHEEL.format("2.14.1%2Bcpu")}#sha256=0">x</a>'
                                      f'<a href="../../files/{WHEEL.format("2.14.1")}">y</a>')
    sources = [("find-links", links), ("index", tmp_path / "simple"), ("index", tmp_path / "missing")]
    assert install.local_cpu_wheels(sources, "cp311", "x86_64") == ["2.14.1+cpu", "2.13.0+cpu"]
    assert install.local_cpu_wheels(sources, "cp311", "aarch64") == ["2.11.0+cpu"]


def test_requirement_and_version_clauses():
    assert install.torch_requirement() == next(
        d for d in re.findall(r'"([^"]+)"', (ROOT / "pyproject.toml").read_text()) if re.match(r"torch\b(?!\w|-)", d))
    assert install._satisfies("2.13.0+cpu", "torch>=2.4")
    assert not install._satisfies("2.13.0+cpu", "torch>=2.4,<2.13")
    assert install._satisfies("2.13.0+cpu", "torch==2.13.*") and not install._satisfies("2.14.1", "torch==2.13.*")


def test_nvidia_gpus_from_nvidia_smi_or_the_driver(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert install.nvidia_gpus(tmp_path / "no-driver") == []
    (tmp_path / "driver" / "gpus" / "0000:17:00.0").mkdir(parents=True)
    assert install.nvidia_gpus(tmp_path / "driver") == ["GPU at PCI 0000:17:00.0"]
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n")
    smi.chmod(0o755)
    assert install.nvidia_gpus(tmp_path / "no-driver") == ["GPU 0: NVIDIA H200 (UUID: GPU-1234)"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\nexit 9\n")
    assert install.nvidia_gpus(tmp_path / "no-driver") == []


# ----------------------------------------------------------------------------- the real script
@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A fresh interpreter without torch (and without pip: pip's configuration then offers nothing local)."""
    env_dir = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    return str(env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


def _dry_run(python, *args, path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL", "NGDIAG_TORCH")}
    if path is not None:
        env["PATH"] = path
    out = subprocess.run([python, str(ROOT / "install.py"), "--dry-run", *args], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    return out.returncode, out.stdout, out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU/CUDA choice is Linux's")
def test_readme_first_command_plans_the_cpu_build_without_a_gpu_and_cuda_with_one(bare_python, tmp_path):
    readme = (ROOT / "README.md").read_text()
    first = _bash_blocks(readme)[0]
    assert "python install.py && ngdiag demo" in first, first
    no_gpu = str(tmp_path / "empty-bin") + os.pathsep + os.path.dirname(bare_python)
    code, out, err = _dry_run(bare_python, path=no_gpu)
    assert code == 0, err
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        assert "no NVIDIA GPU found: installing the CPU build of torch from https://download.pytorch.org/whl/cpu" in out
        assert re.search(r"-m pip install 'torch[^']*' --index-url https://download.pytorch.org/whl/cpu\n", out), out
    assert out.rstrip().endswith("-m pip install -e ."), out

    bin_dir = tmp_path / "gpu-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    code, out, err = _dry_run(bare_python, "test", path=str(bin_dir) + os.pathsep + os.path.dirname(bare_python))
    assert code == 0, err
    assert "1 NVIDIA GPU(s) found (GPU 0: NVIDIA H200 (UUID: GPU-1234))" in out
    assert "--index-url" not in out and out.rstrip().endswith("-m pip install -e '.[test]'"), out


def test_an_installed_torch_is_kept_and_bad_extras_are_refused():
    code, out, err = _dry_run(sys.executable, "test")
    assert code == 0, err
    assert "is already installed: keeping it" in out and "pip install torch" not in out
    code, out, err = _dry_run(sys.executable, "tests")
    assert code == 2 and err.strip() == "install.py: error: unknown extra 'tests'; ngdiag's extras are test, hps, notebooks"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme[readme.index("## Tests"):]
    command = _bash_blocks(tests_section)[0].strip()
    assert command.startswith("python install.py test && ")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci
    hps = [line for line in _bash_blocks(tests_section)[1].strip().splitlines() if "install.py" in line]
    assert hps and hps[0] in ci
