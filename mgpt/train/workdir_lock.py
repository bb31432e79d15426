"""One trainer per workdir: `WORKDIR/lock`, held for the life of the run.

The lock is an flock on that file, so the kernel drops it when its holder dies (kill -9,
the OOM killer, a reboot): a lock left by a dead process never blocks. The file's text
names the holder (host, pid, start time) for the one line a second trainer prints; it is
left in place after the run, because removing it would let two trainers lock two
different files of the same name.

On a pod only process 0 creates the workdir and takes the lock (one lock per run, not per
host) and tells the others whether it got it; a workdir it cannot create or lock (under a
file, read-only) is one line on every process, not a traceback on one and a hang on the rest.
Local and NFS workdirs are locked; object stores (gs://) have no locks, so there the user
must keep to one trainer per workdir (README).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
import numpy as np
from etils import epath

from mgpt.errors import UserError

LOCK_NAME = "lock"


class WorkdirInUse(UserError):
    """Another live trainer holds the workdir; printed as one line."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` creates the workdir and holds its lock, or raises at once:
    WorkdirInUse when another trainer holds it, UserError when it cannot be written."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = epath.Path(workdir)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        error = None
        if jax.process_index() == 0:
            try:
                self.workdir.mkdir(parents=True, exist_ok=True)
                if "://" not in os.fspath(self.workdir):
                    self._acquire()
            except WorkdirInUse as e:
                error = e
            except OSError as e:  # under a file, read-only, a lock file that cannot be opened
                error = UserError(f"--workdir={self.workdir}: cannot write there ({_why(e)}); pick another --workdir")
            except Exception as e:  # noqa: BLE001 - an object store's own errors: still one line, on every host
                error = UserError(f"--workdir={self.workdir}: cannot create it ({type(e).__name__}: {e})"[:400])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Every process learns process 0's outcome, or the others would wait for it forever.
            outcome = 0 if error is None else 1 if isinstance(error, WorkdirInUse) else 2
            outcome = int(multihost_utils.broadcast_one_to_all(np.asarray(outcome, np.int32)))
            if outcome and error is None:
                error = (WorkdirInUse(f"--workdir={self.workdir}: in use by another trainer (process 0 names it)")
                         if outcome == 1 else
                         UserError(f"--workdir={self.workdir}: cannot write there (process 0 says why)"))
        if error is not None:
            self.__exit__()
            raise error
        return self

    def _acquire(self) -> None:
        path = os.path.join(os.fspath(self.workdir), LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirInUse(
                f"--workdir={self.workdir}: in use by the trainer with pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')} (since {holder.get('started', '?')}); let it finish or stop it, "
                "or pick another --workdir"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        self._fd = fd  # held from here: __exit__ releases it even if naming the holder fails
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _why(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror}{where}" if e.strerror else str(e)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}  # written by a holder that is still writing it: the message says '?'
