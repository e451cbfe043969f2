"""Where a conversion writes, so that a failed or killed run never leaves a bundle behind.

The bundle is written into `.NAME.partial-PID` next to OUT and renamed to OUT only when every
file is there (a rename within one folder is atomic), so OUT is either a whole bundle or absent.
Large temporary data (the LLM-only copy of the checkpoint) goes into `.NAME.work-PID` next to
OUT, or under --work-dir: never the system temp folder, which is RAM where /tmp is a tmpfs. Both
are removed when the run ends, however it ends short of SIGKILL; what a killed run left is
removed by the next run for the same OUT. Free space is checked before anything is written.

Standard library only, so it is tested without torch (scripts/test_bundle_staging.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

# Kept free beyond the estimate: file-system overhead and the estimate's own slack.
SPACE_MARGIN = 1.02
SPACE_SLACK_BYTES = 64 << 20


class StagingError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived; raised in the main thread so that cleanup runs."""


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(path: Path, kind: str, name: str) -> int | None:
    stem = f".{name}.{kind}-"
    if not path.name.startswith(stem):
        return None
    tail = path.name[len(stem):]
    return int(tail) if tail.isdigit() else None


class Staging:
    """The staging and work folders of one conversion to `out`. Use as a context manager: on
    leaving it without `commit()`, both folders are removed."""

    def __init__(self, out: Path, work_dir: Path | None = None, overwrite: bool = False):
        self.out = Path(os.path.abspath(out))
        self.name = self.out.name
        if self.out.exists() and not overwrite:
            raise StagingError(f"{self.out} already exists: remove it, choose another output "
                               "folder, or pass --overwrite (the old bundle is replaced only "
                               "once the new one is complete)")
        if self.out.exists() and not self.out.is_dir():
            raise StagingError(f"{self.out} exists and is not a folder")
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        work_root = Path(os.path.abspath(work_dir)) if work_dir else parent
        if not work_root.is_dir():
            raise StagingError(f"--work-dir {work_root} is not a folder")
        pid = os.getpid()
        self.partial = parent / f".{self.name}.partial-{pid}"
        self.work = work_root / f".{self.name}.work-{pid}"
        self._roots = {parent, work_root}
        self._committed = False
        self._old_handlers: dict[int, object] = {}

    def remove_stale(self) -> list[Path]:
        """Removes what earlier runs for this OUT left after being killed (their process is
        gone); returns what it removed."""
        removed = []
        for root in self._roots:
            for kind in ("partial", "work", "old"):
                for path in root.glob(f".{self.name}.{kind}-*"):
                    pid = _pid_of(path, kind, self.name)
                    if pid is None or pid == os.getpid() or _alive(pid):
                        continue
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def require_space(self, needs: list[tuple[Path, int, str]]):
        """`needs`: (folder, bytes, what) for everything about to be written. Folders on one file
        system are summed; an error names the folder, what needs the space and how much."""
        by_device: dict[int, list[tuple[Path, int, str]]] = {}
        for folder, nbytes, what in needs:
            probe = folder if folder.exists() else folder.parent
            by_device.setdefault(os.stat(probe).st_dev, []).append((probe, nbytes, what))
        for entries in by_device.values():
            need = int(sum(n for _, n, _ in entries) * SPACE_MARGIN) + SPACE_SLACK_BYTES
            free = shutil.disk_usage(entries[0][0]).free
            if free < need:
                parts = ", ".join(f"{what} {gb(n)} in {p}" for p, n, what in entries)
                hint = ("free some space there, or put the LLM-only copy on another disk with "
                        "--work-dir" if any(w.startswith("the LLM-only copy") for _, _, w in entries)
                        else "free some space there, or choose an output folder on another disk")
                raise StagingError(f"not enough free space: this conversion writes about "
                                   f"{gb(need)} to {entries[0][0]} ({parts}), and "
                                   f"{gb(free)} is free; {hint}")

    def __enter__(self) -> "Staging":
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.partial.mkdir()
        self.work.mkdir()
        return self

    def _on_signal(self, signum, _frame):
        raise Interrupted(f"stopped by {signal.Signals(signum).name}")

    def finish_work(self):
        """The temporary data is no longer needed: free its disk now, not at the end."""
        shutil.rmtree(self.work, ignore_errors=True)

    def commit(self):
        """Every file of the bundle is in the staging folder: make it OUT."""
        for f in self.partial.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.partial, self.out)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fd = os.open(self.out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self.finish_work()
        if not self._committed:
            shutil.rmtree(self.partial, ignore_errors=True)
            if exc_type is not None:
                print(f"conversion stopped: nothing was written to {self.out}", file=sys.stderr,
                      flush=True)
        if exc_type is Interrupted:
            raise StagingError(str(exc)) from None
        return False


def die_with_parent():
    """For a child process's preexec_fn: the kernel kills the child when this process dies, so a
    killed conversion does not leave llama.cpp's converter writing into a removed folder."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the child may outlive a killed parent
