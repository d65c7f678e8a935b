"""A run directory: what is in it, who writes each file, and holding it for a run.

`python -m gpt2_jax.train` writes everything about a run into one directory (`run_dir=`, default
runs/EXPERIMENT-YYYYmmdd-HHMMSS; a local path or a gs:// / s3:// URL):

  config.json            the resolved run config (`model` and `train`) of the latest start  [record_start]
  config_history.jsonl   one record per start: time, step, host, pid, config, what changed   [record_start]
  metrics.jsonl          a record per logged step: loss, lr, tokens/s, MFU, val loss, ...    [gpt2_jax.metrics]
  tensorboard/           the same as TensorBoard event files                                [gpt2_jax.metrics]
  checkpoints/           Orbax training checkpoints, one folder per step                    [gpt2_jax.checkpoint]
  final.json             the final record (step, loss, val loss, sample, tokens/s), at the end  [write_final]
  .lock                  who holds the directory (a file lock; on a bucket, a lease)         [RunLock]
  library.log            what Orbax, TFDS and asyncio log while the run holds the directory  [library_logs_to]
                         (process I > 0 of a multi-process run: library-process-I.log)
  warnings.log           the details (tracebacks) behind one-line warnings on the console    [report]
  stacks-process-I.log   every thread's stack of process I, when the hang watchdog fired     [gpt2_jax.train.watchdog]
  runtime-process-I.log  the report of JAX's distributed runtime that ended process I        [gpt2_jax.train.supervisor]

Process 0 writes every file except the checkpoints, which every process writes its part of, and
the library, stacks and runtime logs, each process its own. A run
holds its directory with `hold` (the lock, and the libraries' logs sent to library.log) and gives
back what it changed when it ends.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging as absl_logging

from gpt2_jax import files, jsonl, storage
from gpt2_jax.errors import one_line, warn

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"
LIBRARY_LOG = "library.log"
WARNINGS_LOG = "warnings.log"


class RunDirInUse(RuntimeError):
    """Another live process is training in this run directory."""


def report(run_dir, message: str, detail: str | None = None) -> None:
    """One line on stderr; `detail` (a traceback, a long storage error) goes to RUN_DIR/warnings.log,
    which the line names (process 0 writes it)."""
    if detail and jax.process_index() == 0:
        log = storage.path(run_dir) / WARNINGS_LOG
        try:
            files.append_text(log, f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} {message}\n{detail}\n\n")
            message += f" (details: {log})"
        except OSError:
            pass  # a read-only or full run directory: the line alone
    warn(message)


def write_final(run_dir, final: dict[str, Any]) -> None:
    """RUN_DIR/final.json: the run's final record, written once it ended (process 0)."""
    if jax.process_index() == 0:
        files.write_json(storage.path(run_dir) / FINAL_FILE, final)


# --------------------------------------------------------------------------------------------
# The history of a run's configs: one record per start
# --------------------------------------------------------------------------------------------

def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(old: dict | None, new: dict) -> dict[str, list]:
    """{"train.lr": [old, new], ...}: the settings that differ between two run configs."""
    if old is None:
        return {}
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The start records of a run, oldest first (lines that are not records are skipped)."""
    return jsonl.read_tolerant(storage.path(run_dir) / HISTORY_FILE)[0]


def record_start(run_dir: str | os.PathLike, run_config: dict, start_step: int) -> dict[str, list]:
    """Append this start (time, step, host, pid, resolved config, what changed since the previous
    start) to the run's history and make `run_config` the current config.json. Returns the changes."""
    run_dir = storage.path(run_dir)
    history = read_history(run_dir)
    previous = history[-1].get("config") if history else None
    if previous is None and (run_dir / CONFIG_FILE).is_file():  # a run from before the history
        try:
            previous = json.loads((run_dir / CONFIG_FILE).read_text())
        except ValueError:
            previous = None
    changes = config_changes(previous, run_config)
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_step": start_step, "host": socket.gethostname(), "pid": os.getpid(),
        "changed": changes, "config": run_config,
    }
    files.append_text(run_dir / HISTORY_FILE, json.dumps(record, sort_keys=True) + "\n")
    files.write_json(run_dir / CONFIG_FILE, run_config)
    return changes

# --------------------------------------------------------------------------------------------
# Library logs of a run (Orbax, TFDS and asyncio report storage errors as multi-line tracebacks)
# --------------------------------------------------------------------------------------------

class _LogFile:
    """A text stream to a file that is created by the first write: a run that logs nothing leaves no
    empty log behind. A log that cannot be written (a full disk, a file-size limit) is given up,
    never an error of the run."""

    def __init__(self, path: Path):
        self.path, self._f, self._broken = path, None, False

    def _do(self, op) -> int:
        if self._broken:
            return 0
        try:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            return op(self._f) or 0
        except OSError:
            self._broken = True
            return 0

    def write(self, text: str) -> int:
        return self._do(lambda f: f.write(text))

    def flush(self) -> None:
        if self._f is not None:
            self._do(lambda f: f.flush())

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass


def _unraisable_to(stream):
    def unraisable(info):  # "Exception ignored in <coroutine ...>" from a failed async write
        try:
            stream.write(f"{info.err_msg or 'Exception ignored in'}: {info.object!r}\n")
            stream.write("".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)))
            stream.flush()
        except OSError:
            pass
    return unraisable


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def library_log_name() -> str:
    """This process's library log: library.log, or library-process-I.log on process I > 0."""
    i = jax.process_index()
    return LIBRARY_LOG if i == 0 else f"library-process-{i}.log"


@contextlib.contextmanager
def library_logs_to(run_dir: str | os.PathLike):
    """Send what Orbax and TFDS log through absl, asyncio's task errors and Python's "Exception
    ignored" reports to RUN_DIR/library.log instead of the console while the block runs: the console
    keeps the project's one-line reports, which name the file. The file is created by the first
    record. On an object store the log is kept in a local file while the block runs, then appended
    to RUN_DIR/library.log. Everything is put back as it was when the block ends."""
    remote = storage.is_url(run_dir)
    path = (Path(tempfile.mkstemp(prefix="gpt2_jax-library-", suffix=".log")[1]) if remote
            else Path(run_dir).absolute() / library_log_name())
    stream = _LogFile(path)
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(_FORMAT)
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    absl_handler = absl_logging.get_absl_handler().python_handler
    saved_stream, saved_hook = absl_handler.stream, sys.unraisablehook
    # Orbax logs through absl, which writes either through its own handler or, without absl.app,
    # through the root logger's; asyncio logs through the root logger too.
    root.handlers = [file_handler]
    absl_handler.stream = stream
    sys.unraisablehook = _unraisable_to(stream)
    try:
        yield
    finally:
        gc.collect()  # a failed async write's coroutines report themselves when collected: here, not at exit
        root.handlers = saved_handlers
        absl_handler.stream = saved_stream
        sys.unraisablehook = saved_hook
        stream.close()
        if remote:
            _upload_log(path, storage.path(run_dir) / library_log_name())


def _upload_log(local: Path, url) -> None:
    try:
        text = local.read_text(encoding="utf-8", errors="replace")
        if text:
            files.append_text(url, text)
    except OSError as e:
        warn(f"warning: cannot write {url}: {one_line(e)}")
    finally:
        local.unlink(missing_ok=True)


def library_logs_at_exit_to(run_dir: str | os.PathLike) -> None:
    """For a process about to exit after training (only `__main__` calls it, never a library
    caller): what is reported while it shuts down (asyncio's "exception was never retrieved" for a
    failed async write, "Exception ignored" from collected coroutines) goes to RUN_DIR/library.log as
    well, not to the console (for a run directory on an object store, to a local file named
    gpt2_jax-library-*.log in the temporary directory: nothing can be uploaded once the interpreter
    is shutting down)."""
    if storage.is_url(run_dir):
        path = Path(tempfile.gettempdir()) / f"gpt2_jax-library-{os.getpid()}.log"
    else:
        path = Path(run_dir).absolute() / library_log_name()
    if not path.parent.is_dir():
        return
    handler = logging.FileHandler(path, delay=True, encoding="utf-8")
    handler.setFormatter(_FORMAT)
    logging.getLogger().handlers = [handler]
    sys.unraisablehook = _unraisable_to(_LogFile(path))


# --------------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory, held by one training process for the whole run.

    It is an `flock` on RUN_DIR/.lock, which the kernel drops when its holder exits however it exits
    (SIGKILL included): a lock left by a killed process is taken over by the next start. The file
    names the holder (host, pid, start time) so that a refused start can say who holds it. On a
    multi-host run, process 0 holds it for all. Works on local disks and on NFS, where Linux maps
    flock to NFS byte-range locks.

    On an object store (gs://, s3://) there is no flock. The lock is the object RUN_DIR/.lock,
    created with the store's create-if-absent precondition (`ifGenerationMatch=0` on GCS,
    `If-None-Match: *` on S3), so of two starts exactly one creates it. It is a lease: its holder
    rewrites it every `HEARTBEAT_S` seconds and deletes it on exit. A start that finds it takes it
    over when its holder is gone: the lease has not been renewed for `LEASE_S` seconds (a killed or
    preempted host), or it names a process of this host that no longer runs.
    """

    HEARTBEAT_S = 20.0
    LEASE_S = 90.0

    def __init__(self, run_dir: str | os.PathLike):
        self.path = storage.path(run_dir) / LOCK_FILE
        self.remote = storage.is_url(self.path)
        self._fd: int | None = None
        self._record: dict | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.previous: dict | None = None  # the holder recorded by a process that did not release it

    def _holder(self, fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8", errors="replace")
            holder = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _record_now(self) -> dict:
        now = time.time()
        started = (self._record or {}).get("started") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": started,
                "heartbeat": now, "lease_s": self.LEASE_S}

    def _read_object(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _gone(self, holder: dict | None) -> bool:
        """Whether the holder of the lock object no longer holds it."""
        if holder is None:  # deleted meanwhile, or not a record
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        beat = holder.get("heartbeat")
        lease = holder.get("lease_s", self.LEASE_S)
        return not isinstance(beat, (int, float)) or time.time() - beat > float(lease)

    def _acquire_object(self) -> None:
        for _ in range(3):
            self._record = self._record_now()
            if storage.create_new(self.path, json.dumps(self._record).encode()):
                break
            holder = self._read_object()
            if not self._gone(holder):
                raise RunDirInUse(
                    f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                    f"(since {holder.get('started', '?')}; its lease {self.path} is renewed every {self.HEARTBEAT_S:.0f} s "
                    f"and taken over {self.LEASE_S:.0f} s after it stops); wait for that run to end, stop it, or choose another run_dir="
                )
            self.previous = holder or self.previous
            storage.remove(self.path)  # a dead holder's lease: removed, then created again under the precondition
        else:
            raise RunDirInUse(f"{self.path.parent}: another start took its lock {self.path} at the same moment; retry")
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                holder = self._read_object()
                if holder is not None and (holder.get("host"), holder.get("pid")) != (socket.gethostname(), os.getpid()):
                    warn(f"warning: {self.path} was taken over by pid {holder.get('pid')} on {holder.get('host')}; "
                         "this run no longer holds its run directory")
                    return
                self._record = self._record_now()
                storage.write_bytes(self.path, json.dumps(self._record).encode())
            except Exception as e:  # a transient store error: the next beat retries
                warn(f"warning: cannot renew {self.path}: {one_line(e)}")

    def acquire(self) -> "RunLock":
        if self.remote:
            self._acquire_object()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd) or {}
            os.close(fd)
            raise RunDirInUse(
                f"{self.path.parent} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
                f"(since {holder.get('started', '?')}); wait for that run to end, stop it, or choose another run_dir="
            ) from None
        self.previous = self._holder(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self.remote:
            if self._beat is not None:
                self._stop.set()
                self._beat.join()
                self._beat = None
                holder = self._read_object()
                if holder is not None and (holder.get("host"), holder.get("pid")) == (socket.gethostname(), os.getpid()):
                    storage.remove(self.path)
            return
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()



# --------------------------------------------------------------------------------------------
# Holding a run directory for a run
# --------------------------------------------------------------------------------------------


class Run:
    """A run directory held by this run (see `hold`): records its starts and its final record."""

    def __init__(self, path):
        self.path = path
        self.started = False  # a start was recorded: from then on the directory holds this run

    def record_start(self, run_config: dict, start_step: int) -> dict[str, list]:
        """`record_start` for this directory (process 0); every process learns the changes."""
        self.started = True
        return record_start(self.path, run_config, start_step) if jax.process_index() == 0 else {}

    def write_final(self, final: dict[str, Any]) -> None:
        write_final(self.path, final)


def _lock(run_dir, stack: contextlib.ExitStack) -> RunLock | None:
    """Process 0 takes the run directory's lock for all processes; every process learns whether it
    was refused (a second start of the same run fails at once everywhere)."""
    lock, error = None, None
    if jax.process_index() == 0:
        storage.path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            lock = stack.enter_context(RunLock(run_dir))
        except RunDirInUse as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(refused) and error is None:
            error = RunDirInUse(f"{run_dir} is in use by another run (see process 0)")
    if error is not None:
        raise error
    return lock


def _remove_if_new(path, existed: bool) -> None:
    if existed or storage.is_url(path):
        return
    with contextlib.suppress(OSError):
        if path.is_dir():
            path.rmdir()  # only when empty
        else:
            path.unlink()


@contextlib.contextmanager
def hold(run_dir, say: Callable[[str], None] = lambda _: None) -> Iterator[Run]:
    """Hold `run_dir` for a run: its lock (a second start is refused at once), and the libraries'
    multi-line logs sent to library.log in it. A start that fails before it recorded itself
    (`Run.record_start`) removes what it created: the directory, the lock file, the log."""
    run_dir = storage.path(run_dir)
    names = (LIBRARY_LOG, LOCK_FILE, "")
    existed = {n: (run_dir / n if n else run_dir).exists() for n in names} if jax.process_index() == 0 else {}
    run = Run(run_dir)
    try:
        with contextlib.ExitStack() as stack:
            lock = _lock(run_dir, stack)
            if lock is not None:
                if lock.previous:
                    say(f"took over the run directory from pid {lock.previous.get('pid')} on {lock.previous.get('host')}, "
                        "which ended without releasing it")
            if lock is not None or jax.process_index() > 0:  # each process of a pod its own log
                stack.enter_context(library_logs_to(run_dir))
            yield run
    except BaseException:
        if not run.started:
            for n in names:
                if n in existed:
                    _remove_if_new(run_dir / n if n else run_dir, existed[n])
        raise
