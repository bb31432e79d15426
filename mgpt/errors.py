"""The one error a user can fix, and the wrapper every command reports it with.

A `UserError` names the flag, setting or file and says what to do, in one line. Each
command's `main` is wrapped in `reported`, which prints that line on stderr and exits
with code 2 (absl's code for a bad command line). Anything else is our bug and keeps
its traceback; a run that fails on its own (a full disk, a diverging loss) exits 1.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

EXIT_CODE = 2


class UserError(ValueError):
    """A mistake in the flags, the config or the input files; printed as one line."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named is not there. Also a FileNotFoundError, for the
    callers that carry on without it (a dataset with no validation split)."""


def reported(main):
    """`main` with a UserError turned into its one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(e, file=sys.stderr, flush=True)
            stop = SystemExit(str(e))  # str() is the line, for callers in this process
            stop.code = EXIT_CODE  # an int code: the interpreter exits with it and prints nothing more
            raise stop from None

    return wrapped


NO_SPACE = "No space left on device"


def parse_command_flags(fv, argv, command: str, help_text: str) -> bool:
    """absl FlagValues `fv` <- `argv` for `python -m command`: False after printing the help for
    --help; a bad flag or a stray argument is a UserError that names it."""
    from absl import flags

    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(help_text + "\n\nFlags:\n" + fv.get_help(include_special_flags=False))
        return False
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UserError(f"{e} (see python -m {command} --help)") from None
    if len(rest) > 1:
        raise UserError(f"unexpected arguments: {rest[1:]}")
    return True


def is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in an exception's chain (TFDS and orbax wrap it in their own errors,
    tensorstore's as ValueError text)."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or NO_SPACE in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# Once a full disk is reported, orbax's threads keep failing as the process exits
# ("cannot schedule new futures after shutdown"): nothing they say adds to that line.
_disk_full_reported = threading.Event()


def not_disk_full(record) -> bool:
    """A logging filter: drops records about a full disk, and every record once it is reported."""
    if _disk_full_reported.is_set():
        return False
    return NO_SPACE not in record.getMessage() and not (record.exc_info and is_disk_full(record.exc_info[1]))


def quiet_after_disk_full() -> None:
    """Once a full disk is being reported (one line, exit code 1: a failure of the run, not a
    user's mistake), the threads that keep failing on the same disk (orbax, tensorboardX's
    exit-time flush) say nothing more. Called first, before that line is even put together.
    Nor do the writes orbax had queued and never started: at exit, each "coroutine ... was never
    awaited" (a CI run printed one after the line)."""
    _disk_full_reported.set()
    sys.unraisablehook = threading.excepthook = lambda *_: None
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


def quiet_dead_event_loop() -> None:
    """Drops tensorstore's "Event loop is closed" from the unraisable-exception hook.

    When a checkpoint write fails (a full disk), orbax's save finishes and closes its event
    loop while tensorstore's other writes are still in flight; each of those then reports,
    from its own thread and before the failure reaches `main`, that it found the loop
    closed. They say nothing the one-line report does not, and printed from several threads
    at once they interleave into garbage. Every other unraisable exception is still reported.
    """
    hook = sys.unraisablehook

    def quiet(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)

    sys.unraisablehook = quiet


class ExitOnInterrupt:
    """`with ExitOnInterrupt(line):` a Ctrl-C prints `line()` on stderr and ends the process at once (exit 1).

    For a command's `main` (never library code: it ends the whole process, a notebook's kernel
    included), where the work on disk is already safe at any instant (checkpoints finalized, pieces
    listed in a manifest only once written). A KeyboardInterrupt raised inside jax's tracing or
    compilation, or while grain and orbax run their threads, printed a traceback, or left the
    interpreter to crash (SIGSEGV) or hang on its way out after printing its line. In a
    multi-process run the other processes, left waiting in a collective, stop at jax's heartbeat
    timeout, as they would for a process that was killed.
    """

    def __init__(self, line: Callable[[], str], *, after_progress_bar: bool = False):
        self._line = line
        self._installed = False
        self._previous = None
        self._prefix = "\n" if after_progress_bar else ""  # a bar's last update ends without one

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        exit_with_line(lambda: self._prefix + self._line(), "interrupted")

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)


def exit_with_line(line: Callable[[], str], fallback: str) -> None:
    """Print `line()` (or `fallback` if it fails) on stderr and end the process now, with exit code 1."""
    try:
        text = line()
    except Exception:  # noqa: BLE001 - the process ends either way
        text = fallback
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe (`| head`) must not stop the exit
            pass
    try:
        os.write(2, (text + "\n").encode())
    finally:
        os._exit(1)
