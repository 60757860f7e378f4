"""Output folders: checked before anything happens, one writer at a time, only ngdiag's files touched.

Output folders are handled here only, so that every command follows the same rules:

- **checked before anything happens** (:func:`check_output_folder`, :func:`open_output`): an output
  path that is a symbolic link, a file, not writable, or that is, contains or lies inside one of
  the run's inputs (checkpoint, base, prompts file, shards being merged...) is refused before a
  model is loaded or a file is written;
- **one writer per folder** (:class:`RunFolder`): the writer holds an OS lock (``fcntl.flock``) on
  ``.ngdiag.lock`` for its whole life; a second writer is refused with the first one's pid, host and
  command. The kernel releases the lock when its process dies, so a killed run's folder is taken
  over by the next run without any manual cleanup;
- **only ngdiag's files are ever replaced or deleted**: every file a run writes is first listed in
  the folder's manifest ``.ngdiag-files``; ``--overwrite`` deletes exactly the listed files, a file
  that is not listed is never replaced, and a folder without a manifest (one ngdiag did not write)
  is never overwritten. Nothing is written through a symbolic link.

A durable run (:mod:`ngdiag.runs.engine`) starts or resumes in its folder with
:meth:`RunFolder.begin` and writes every file through :meth:`RunFolder.write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import stat
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional, Tuple

from ngdiag.core.io import atomic_write, atomic_write_text
from ngdiag.core.errors import ConfigError
from ngdiag.runs.state import STATE_FILE, read_state

__all__ = [
    "check_not_input", "check_output_folder", "check_output_file", "open_output", "lock_output", "use_output",
    "RunFolder", "LOCK_FILE", "MANIFEST_FILE", "Inputs",
]

LOCK_FILE = ".ngdiag.lock"
MANIFEST_FILE = ".ngdiag-files"
_BOOKKEEPING = frozenset({LOCK_FILE, MANIFEST_FILE})

#: ``(label, path)`` pairs naming a run's inputs, e.g. ``[("checkpoint", "runs/ft"), ("base", None)]``
Inputs = Iterable[Tuple[str, object]]


# ----------------------------------------------------------------------------- path checks
def _real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def check_not_input(out, inputs: Inputs, *, what: str = "output folder") -> None:
    """Refuse an output path that is, contains or lies inside one of ``inputs`` (``(label, path)``).

    Paths are compared after resolving symbolic links; inputs that are not local paths (``None``,
    hub ids) are skipped.
    """
    out = Path(out)
    target = _real(out)
    for label, path in inputs:
        if path is None or str(path) == "" or not os.path.exists(os.fspath(path)):
            continue
        src = _real(path)
        if target == src:
            raise ConfigError(f"{what} {out} is the {label} {path}; choose another output path")
        if target in src.parents:
            raise ConfigError(f"{what} {out} contains the {label} {path}; choose another output path")
        if src in target.parents:
            raise ConfigError(f"{what} {out} lies inside the {label} {path}; choose another output path")


def _check_path(out: Path, inputs: Inputs, what: str, *, folder: bool) -> None:
    """Symbolic link, wrong type, input overlap, writability: checks that write nothing."""
    if out.is_symlink():
        raise ConfigError(f"{what} {out} is a symbolic link; ngdiag does not write through links, give the real path")
    if out.exists():
        if folder and not out.is_dir():
            raise ConfigError(f"{what} {out} exists and is not a folder")
        if not folder and out.is_dir():
            raise ConfigError(f"{what} {out} is a folder; give the path of the file to write")
    check_not_input(out, inputs, what=what)
    probe = out if (folder and out.is_dir()) else out.parent
    while not os.path.lexists(probe):
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create {what} {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is not writable" if probe == out else f"cannot be created: {probe} is not writable"
        raise ConfigError(f"{what} {out} {where}")


def _content(out: Path) -> list:
    """What a folder holds apart from ngdiag's lock and manifest."""
    if not out.is_dir():
        return []
    return [c for c in out.iterdir() if c.name not in _BOOKKEEPING]


def _check_content(out: Path, *, kind: str, overwrite: bool, what: str) -> None:
    """An existing folder may hold nothing, an unfinished ``kind`` run, or (``overwrite``) ngdiag's output."""
    if not _content(out):
        return
    state = read_state(out)
    owned = (out / MANIFEST_FILE).is_file() and not (out / MANIFEST_FILE).is_symlink()
    if state is not None and state["kind"] == kind and not state["complete"]:
        return  # resumed, restarted or refused by RunFolder.begin, which compares the run's fingerprint
    if not owned:
        raise ConfigError(f"{what} {out} already exists and holds files ngdiag did not write; choose another output "
                          "folder (--overwrite only replaces ngdiag's own output)")
    if not overwrite:
        held = f"an ngdiag {state['kind']} run" if state is not None else "ngdiag output"
        raise ConfigError(f"{what} {out} already exists and holds {held}; pass --overwrite to replace it or choose another output folder")


def check_output_folder(out, *, kind: str, inputs: Inputs = (), overwrite: bool = False, what: str = "output folder") -> Path:
    """Check an output folder without writing anything (see the module docstring); returns it.

    Args:
        out: the folder (it need not exist).
        kind: the run kind (``"audit"``, ``"sensitivity"``); an unfinished run of that kind may be resumed.
        inputs: ``(label, path)`` of the run's inputs; the folder must not be, contain or lie inside one.
        overwrite: whether ngdiag's own output in the folder may be replaced.
    """
    out = Path(out)
    _check_path(out, list(inputs), what, folder=True)
    _check_content(out, kind=kind, overwrite=overwrite, what=what)
    return out


def check_output_file(path, *, inputs: Inputs = (), overwrite: bool = False, owned: Optional[Callable[[Path], bool]] = None,
                      what: str = "output file") -> Path:
    """Check the path of a single output file (an HTML report) without writing anything; returns it.

    An existing file is replaced only with ``overwrite`` and when ``owned(path)`` says ngdiag wrote it.
    """
    path = Path(path)
    _check_path(path, list(inputs), what, folder=False)
    if path.exists():
        if owned is None or not owned(path):
            raise ConfigError(f"{what} {path} already exists and was not written by ngdiag; choose another path")
        if not overwrite:
            raise ConfigError(f"{what} {path} already exists; pass --overwrite to replace it or choose another path")
    return path


def open_output(out, *, kind: str, inputs: Inputs = (), overwrite: bool = False, what: str = "output folder") -> "RunFolder":
    """Check ``out`` (:func:`check_output_folder`), create it and lock it: the one entry point of a run's folder.

    Returns the locked :class:`RunFolder`; close it (or use it as a context manager) when the run ends.
    Raises :class:`ConfigError` before anything is written when the folder is unusable, and when
    another process holds it (naming that process).
    """
    inputs = list(inputs)
    out = check_output_folder(out, kind=kind, inputs=inputs, overwrite=overwrite, what=what)
    folder = RunFolder._locked(out, kind=kind, overwrite=overwrite, what=what)
    try:  # again under the lock: another process may have written in between
        _check_content(out, kind=kind, overwrite=overwrite, what=what)
    except BaseException:
        folder.close()
        raise
    return folder


def lock_output(out, *, inputs: Inputs = (), what: str = "output folder") -> "RunFolder":
    """Check the path of ``out`` (link, type, inputs, writability), create and lock it; no content rules.

    For writers with their own rules on what a folder may hold (the trainer), and for saving a
    result into a folder: :meth:`RunFolder.write` still never replaces a file ngdiag did not write.
    """
    out = Path(out)
    _check_path(out, list(inputs), what, folder=True)
    return RunFolder._locked(out, kind=None, overwrite=False, what=what)


@contextlib.contextmanager
def use_output(out, *, kind: str, inputs: Inputs = (), overwrite: bool = False):
    """The run folder of a library call: ``out`` is a path (opened here with :func:`open_output` and
    closed at the end) or a :class:`RunFolder` the caller opened (checked against ``inputs``, left open)."""
    inputs = list(inputs)
    if isinstance(out, RunFolder):
        check_not_input(out.path, inputs, what=out.what)
        yield out
        return
    with open_output(out, kind=kind, inputs=inputs, overwrite=overwrite) as folder:
        yield folder


# ----------------------------------------------------------------------------- the lock
def _command_line() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(os.path.join("ngdiag", "cli", "__main__.py")) or os.path.basename(argv[0]) == "ngdiag"):
        argv[0] = "ngdiag"
    text = shlex.join(argv) if argv else "python"
    return text if len(text) <= 300 else text[:297] + "..."


def _holder(fd: int) -> str:
    """Who holds the lock, from the lock file's content (written right after the lock was taken)."""
    info = None
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
            break
        except (OSError, ValueError):
            time.sleep(0.05)
    if not isinstance(info, dict):
        return "pid unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"


def _take_lock(folder: Path, what: str) -> int:
    import fcntl

    path = folder / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(50):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write to {what} {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{what} {folder} is in use by another ngdiag process ({holder}); "
                              "wait for it to end or choose another output folder") from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock {what} {folder}: {exc.strerror}") from None
        try:  # the file may have been removed by its previous holder between open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
            return fd
        os.close(fd)
    raise ConfigError(f"cannot lock {what} {folder}: its lock file keeps changing")


# ----------------------------------------------------------------------------- the folder
def _valid_entry(line: str) -> bool:
    p = PurePosixPath(line.rstrip("/"))
    return bool(line) and "\0" not in line and not p.is_absolute() and ".." not in p.parts and str(p) not in ("", ".")


class RunFolder:
    """An output folder held by this process (see the module docstring). Use :func:`open_output`.

    Every file goes through :meth:`write` (atomic, listed in the manifest first). :meth:`close`
    releases the lock; after a failed run it also removes what this run wrote when that holds no
    results, and the folder itself when this run created it and it is empty again.
    """

    def __init__(self, path: Path, *, kind: Optional[str], overwrite: bool, what: str, created: list, fd: int):
        self.path = path
        self.kind = kind
        self.overwrite = overwrite
        self.what = what
        self._created = created  # folders this process created, outermost first
        self._fd: Optional[int] = fd
        self._began = False
        self._listed = set(self._manifest(path))

    # -- opening and closing
    @classmethod
    def _locked(cls, out: Path, *, kind, overwrite: bool, what: str) -> "RunFolder":
        created = []
        missing = []
        p = out
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                    created.append(d)
                except FileExistsError:
                    pass
            fd = _take_lock(out, what)
        except BaseException as exc:
            for d in reversed(created):
                _rmdir_quiet(d)
            if isinstance(exc, OSError):
                raise ConfigError(f"cannot create {what} {out}: {exc.strerror}") from None
            raise
        return cls(out, kind=kind, overwrite=overwrite, what=what, created=created, fd=fd)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """Release the lock. After a failure, remove this run's files when they hold no results."""
        if self._fd is None:
            return
        try:
            if failed and self._began and not self.holds_results(self.path):
                self.clear()
            if not _content(self.path) and not any(self._exists(e) for e in self._listed):
                _unlink_quiet(self.path / MANIFEST_FILE)
                self._listed.clear()
                _unlink_quiet(self.path / LOCK_FILE)
                for d in reversed(self._created):
                    _rmdir_quiet(d)
            else:
                _unlink_quiet(self.path / LOCK_FILE)
        finally:
            os.close(self._fd)
            self._fd = None

    # -- what the folder holds
    @staticmethod
    def _manifest(path: Path) -> list:
        if (path / MANIFEST_FILE).is_symlink():  # not ngdiag's: it writes the manifest itself, never a link
            return []
        try:
            text = (path / MANIFEST_FILE).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in text.split("\n") if _valid_entry(line)]

    @classmethod
    def holds_results(cls, path) -> bool:
        """Whether the folder holds any file ngdiag wrote besides the run state."""
        path = Path(path)
        for entry in cls._manifest(path):
            if not entry.endswith("/") and entry != STATE_FILE and os.path.isfile(path / entry):
                return True
        return False

    def _exists(self, entry: str) -> bool:
        return os.path.lexists(self.path / entry.rstrip("/"))

    def state(self) -> Optional[dict]:
        return read_state(self.path)

    def exists(self, rel) -> bool:
        """Whether ``rel`` is a file this folder's runs wrote (a file ngdiag did not list does not count)."""
        return str(PurePosixPath(str(rel).replace(os.sep, "/"))) in self._listed and _is_regular(self.path / rel)

    # -- writing
    def _record(self, entry: str) -> None:
        if entry in self._listed:
            return
        manifest = self.path / MANIFEST_FILE
        if manifest.is_symlink():
            raise ConfigError(f"{manifest} is a symbolic link; ngdiag does not write through links")
        with open(manifest, "a", encoding="utf-8") as fh:
            fh.write(entry + "\n")
        self._listed.add(entry)

    def _target(self, rel) -> Tuple[Path, str]:
        if self._fd is None:
            raise ConfigError(f"{self.what} {self.path} is closed")
        rel = PurePosixPath(str(rel).replace(os.sep, "/"))
        if not _valid_entry(str(rel)):
            raise ConfigError(f"invalid file name {rel} inside {self.path}")
        cur = self.path
        for i, part in enumerate(rel.parts[:-1]):
            cur = cur / part
            entry = "/".join(rel.parts[: i + 1]) + "/"
            if cur.is_symlink():
                raise ConfigError(f"{cur} is a symbolic link; ngdiag does not write through links")
            if not cur.exists():
                self._record(entry)
                cur.mkdir()
            elif not cur.is_dir():
                raise ConfigError(f"{cur} is not a folder; ngdiag does not replace it")
        return self.path / str(rel), str(rel)

    def write(self, rel, writer: Callable[[str], None]) -> Path:
        """Write ``rel`` (a path inside the folder) atomically through ``writer(tmp_path)``.

        A file that is not ngdiag's (not in the manifest) is never replaced.
        """
        target, entry = self._target(rel)
        if os.path.lexists(target) and entry not in self._listed:
            raise ConfigError(f"{target} exists and was not written by ngdiag; not replacing it")
        self._record(entry)
        atomic_write(target, writer)
        return target

    def write_text(self, rel, text: str) -> Path:
        """:meth:`write` of UTF-8 ``text``."""
        return self.write(rel, lambda p: Path(p).write_text(text, encoding="utf-8"))

    def clear(self) -> None:
        """Delete every file listed in the manifest (and their leftover temporary files); keep the rest."""
        files = sorted((e for e in self._listed if not e.endswith("/")), key=lambda e: -e.count("/"))
        for entry in files:
            target = self.path / entry
            if self._inside(target.parent):
                if _is_regular(target):
                    _unlink_quiet(target)
                if target.parent.is_dir():
                    for tmp in target.parent.glob(f".{target.name}.*.tmp"):
                        if _is_regular(tmp):
                            _unlink_quiet(tmp)
        for entry in sorted((e for e in self._listed if e.endswith("/")), key=lambda e: -e.count("/")):
            d = self.path / entry.rstrip("/")
            if self._inside(d) and d.is_dir() and not d.is_symlink():
                _rmdir_quiet(d)
        self._listed = {e for e in self._listed if self._exists(e)}
        atomic_write_text(self.path / MANIFEST_FILE, "".join(e + "\n" for e in sorted(self._listed)))

    def _inside(self, d: Path) -> bool:
        """``d`` is the folder or a real (not linked) subfolder of it."""
        while d != self.path:
            if d.is_symlink() or self.path not in d.parents:
                return False
            d = d.parent
        return True

    # -- a durable run
    def begin(self, state: dict) -> bool:
        """Start or resume the run described by ``state`` (``kind``, ``fingerprint``, ``shard``...).

        Resumes (returns ``True``) when the folder holds an unfinished run with the same kind,
        fingerprint and shard. Otherwise ngdiag's files are deleted first when ``overwrite`` is set
        or when the folder holds an unfinished run of the same kind without results, and the run
        is refused when the folder holds anything else. Then writes the state file.
        """
        prev = self.state()
        resumable = (prev is not None and prev["kind"] == state["kind"] and prev["fingerprint"] == state["fingerprint"]
                     and list(prev["shard"]) == list(state["shard"]) and not prev["complete"])
        if _content(self.path) and not resumable:
            unfinished = prev is not None and prev["kind"] == state["kind"] and not prev["complete"]
            if not (self.overwrite or (unfinished and not self.holds_results(self.path))):
                if unfinished:
                    raise ConfigError(f"{self.what} {self.path} holds an unfinished {prev['kind']} run with other arguments; "
                                      "rerun that command to resume it, pass --overwrite to start over, or choose another output folder")
                raise ConfigError(f"{self.what} {self.path} already exists; pass --overwrite to replace it or choose another output folder")
            self.clear()
        self._began = True
        self.write_text(STATE_FILE, json.dumps(state, indent=2))
        return resumable


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_quiet(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
