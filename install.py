#!/usr/bin/env python3
"""Install ngdiag into the current Python environment, with the right build of torch.

    python install.py                 # torch, then ngdiag (pip install -e .)
    python install.py test            # ... with the test extras (pip install -e ".[test]")
    python install.py test,hps        # several extras
    python install.py --dry-run       # print the decisions and the pip commands, install nothing

torch comes first, because a plain ``pip install torch`` (or installing ngdiag, which requires torch)
takes a CUDA build of several GB on Linux even where there is no GPU:

1. ``TORCH_SPEC`` set (e.g. ``TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"``): exactly that, from
   ``TORCH_INDEX_URL`` when set.
2. torch already installed: kept as it is (the script is idempotent; a rerun installs nothing new).
3. An NVIDIA GPU (``nvidia-smi -L`` lists one, or ``/proc/driver/nvidia/gpus`` has an entry), or
   ``--torch cuda``: torch from the package index (on Linux the default wheels are CUDA builds).
4. No GPU, or ``--torch cpu``, on Linux: the CPU build. First a CPU wheel (``torch-X+cpu``) that
   pip's own configuration already offers (a ``find-links`` folder or a local ``file://`` index,
   as on machines that keep wheels on disk); else PyTorch's CPU index
   (``https://download.pytorch.org/whl/cpu``, or ``TORCH_INDEX_URL``). On macOS and Windows the
   default wheels are CPU builds already.

Then ngdiag itself in editable mode with the requested extras, and a check that the installed torch
is the build that was asked for. Standard library only; runs with Python 3.10 and newer.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent
CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
EXTRAS = ("test", "hps", "notebooks")
_WHEEL = re.compile(r"torch-(?P<version>[^-]+)-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl")


def say(message: str) -> None:
    print(f"install.py: {message}", flush=True)


def fail(message: str, code: int = 2) -> "None":
    print(f"install.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------- what is there
def nvidia_gpus(proc_root: Path = Path("/proc/driver/nvidia")) -> list:
    """Names of the NVIDIA GPUs this machine has: from ``nvidia-smi -L``, else the driver's
    ``/proc/driver/nvidia/gpus`` entries. Empty on a machine without one (or without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0:
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU")]
            if gpus:
                return gpus
    gpus_dir = proc_root / "gpus"
    try:
        return sorted(f"GPU at PCI {p.name}" for p in gpus_dir.iterdir())
    except OSError:
        return []


def installed_torch() -> "str | None":
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_build(python: str = sys.executable) -> dict:
    """``{"version", "cuda"}`` of the torch that ``python`` imports (``cuda`` is None for a CPU build)."""
    code = "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda}))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"torch does not import:\n{out.stderr.strip()[-2000:]}", 1)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_requirement(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """ngdiag's own requirement on torch (e.g. ``torch>=2.4``), from pyproject.toml."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+

        deps = tomllib.loads(text)["project"]["dependencies"]
    except ImportError:
        deps = re.findall(r'"([^"]+)"', text.split("dependencies", 1)[1].split("]", 1)[0])
    for dep in deps:
        if re.match(r"torch(?![\w.-])", dep.strip()):
            return dep.strip()
    return "torch"


def _release(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _satisfies(version: str, requirement: str) -> bool:
    """Whether ``version`` meets the version clauses of ``requirement`` (``torch>=2.4,<2.16``)."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    have = _release(version)
    for op, want in re.findall(r"(>=|<=|==|!=|>|<)\s*([0-9][0-9.*]*)", requirement):
        want = want.rstrip(".*")
        n = len(_release(want)) if op in ("==", "!=") else 3
        a, b = have[:n], _release(want)
        b = b + (0,) * (len(a) - len(b))
        if not ops[op](a, b):
            return False
    return True


def pip_sources(python: str = sys.executable) -> list:
    """Local folders that pip is configured to take packages from: ``find-links`` folders and
    ``file://`` indexes (``pip config list``, which includes ``PIP_*`` variables)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    sources = []
    for line in out.stdout.splitlines():
        m = re.match(r"^\S*?(find-links|index-url|extra-index-url)='(.*)'$", line.strip())
        if not m:
            continue
        for value in m.group(2).split():
            if value.startswith("file:"):
                path = Path(unquote(urlparse(value).path))
            elif "://" in value:
                continue  # a remote index: pip asks it anyway
            else:
                path = Path(value)
            kind = "find-links" if m.group(1) == "find-links" else "index"
            if (kind, path) not in sources:
                sources.append((kind, path))
    return sources


def local_cpu_wheels(sources, python_tag: str, machine: str) -> list:
    """``torch-X+cpu`` wheel versions for this Python and machine in local pip sources."""
    names = []
    for kind, path in sources:
        try:
            if kind == "find-links":
                names += [p.name for p in path.glob("torch-*.whl")]
            else:
                page = path / "torch" / "index.html"
                if page.is_file():
                    names += re.findall(r"torch-[^\"'<>#/]+\.whl", page.read_text(errors="replace"))
                elif (path / "torch").is_dir():
                    names += [p.name for p in (path / "torch").glob("torch-*.whl")]
        except OSError:
            continue
    versions = set()
    for name in names:
        m = _WHEEL.fullmatch(unquote(name))
        if (m and m["version"].endswith("+cpu") and m["python"] == python_tag
                and m["platform"].endswith(machine) and "linux" in m["platform"]):
            versions.add(m["version"])
    return sorted(versions, key=_release, reverse=True)


# ----------------------------------------------------------------------------- the plan
def plan_torch(want: str, *, system: str, machine: str, gpus: list, installed: "str | None",
               spec: "str | None", index_url: "str | None", requirement: str, local_cpu: list) -> tuple:
    """``(message, pip arguments or None)`` for torch. Pure: every fact is an argument."""
    if spec:
        args = shlex.split(spec) + (["--index-url", index_url] if index_url else [])
        return f"TORCH_SPEC={spec!r}: installing exactly that", args
    if installed:
        return f"torch {installed} is already installed: keeping it", None
    if want == "auto":
        want = "cuda" if gpus else "cpu"
        found = f"{len(gpus)} NVIDIA GPU(s) found ({gpus[0]})" if gpus else "no NVIDIA GPU found"
    else:
        found = f"--torch {want}"
    if want == "cuda":
        if system == "Windows" and not index_url:
            return (f"{found}: on Windows the default torch wheels are CPU builds; set TORCH_INDEX_URL to "
                    f"PyTorch's CUDA index (https://download.pytorch.org/whl/cu126 or newer) for a CUDA build",
                    [requirement])
        extra = ["--index-url", index_url] if index_url else []
        return f"{found}: installing torch with CUDA from the package index ({requirement})", [requirement] + extra
    if system != "Linux":
        return f"{found}: installing torch ({requirement}; the default wheels on {system} are CPU builds)", [requirement]
    usable = [v for v in local_cpu if _satisfies(v, requirement)]
    if usable and not index_url:
        return (f"{found}: installing the CPU build torch=={usable[0]} that pip's configured local sources offer",
                [f"torch=={usable[0]}"])
    url = index_url or CPU_INDEX_URL
    return f"{found}: installing the CPU build of torch from {url}", [requirement, "--index-url", url]


def parse_extras(text: str) -> list:
    extras = [e.strip() for e in text.replace(" ", ",").split(",") if e.strip()]
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        fail(f"unknown extra {unknown[0]!r}; ngdiag's extras are {', '.join(EXTRAS)}")
    return list(dict.fromkeys(extras))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extras", nargs="?", default="", help=f"comma-separated extras: {', '.join(EXTRAS)}")
    parser.add_argument("--torch", choices=("auto", "cpu", "cuda"), default=os.environ.get("NGDIAG_TORCH", "auto"),
                        help="which torch build to install when none is installed (default: auto-detect a GPU)")
    parser.add_argument("--dry-run", action="store_true", help="print the decisions and pip commands; install nothing")
    args = parser.parse_args(argv)
    extras = parse_extras(args.extras)
    if sys.version_info < (3, 10):
        fail(f"ngdiag needs Python 3.10 or newer; this is {platform.python_version()}")
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix) and not os.environ.get("CONDA_PREFIX"):
        say(f"note: {sys.executable} is not a virtual environment; "
            "`python3 -m venv .venv && . .venv/bin/activate` makes one")

    pip = [sys.executable, "-m", "pip", "install"]
    system, machine = platform.system(), platform.machine().lower()
    spec, index_url = os.environ.get("TORCH_SPEC", "").strip(), os.environ.get("TORCH_INDEX_URL", "").strip() or None
    installed = installed_torch()
    gpus = nvidia_gpus() if not spec and not installed else []
    requirement = torch_requirement()
    local_cpu = []
    if not spec and not installed and system == "Linux" and (args.torch == "cpu" or (args.torch == "auto" and not gpus)):
        local_cpu = local_cpu_wheels(pip_sources(), f"cp{sys.version_info[0]}{sys.version_info[1]}", machine)
    message, torch_args = plan_torch(args.torch, system=system, machine=machine, gpus=gpus, installed=installed,
                                     spec=spec or None, index_url=index_url, requirement=requirement,
                                     local_cpu=local_cpu)
    target = f".[{','.join(extras)}]" if extras else "."
    commands = ([pip + torch_args] if torch_args else []) + [pip + ["-e", target]]
    say(message)
    where = "" if Path.cwd().resolve() == ROOT else f"  (in {ROOT})"
    for command in commands:
        say("$ " + shlex.join(command) + where)
        if not args.dry_run:
            code = subprocess.run(command, cwd=ROOT).returncode
            if code != 0:
                fail(f"pip failed (exit code {code}) running: {shlex.join(command)}", code)
    if args.dry_run:
        return 0

    build = torch_build()
    kind = f"CUDA {build['cuda']} build" if build["cuda"] else "CPU build"
    say(f"torch {build['version']} ({kind}); ngdiag{'[' + ','.join(extras) + ']' if extras else ''} installed "
        f"in editable mode into {sys.prefix}")
    asked_cpu = torch_args is not None and not spec and (args.torch == "cpu" or (args.torch == "auto" and not gpus))
    if asked_cpu and build["cuda"]:
        fail(f"a CUDA build of torch was installed although the CPU build was asked for; pip's sources offer no "
             f"CPU build that meets {requirement!r}. Set TORCH_SPEC (and TORCH_INDEX_URL) to a CPU build and rerun "
             f"in a fresh environment (docs/dependencies.md)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
