"""The parent of a multi-process run's trainer on the command line: when a host is gone, it speaks last.

When a process of a multi-process run disappears (SIGKILL, a machine gone), JAX's distributed
runtime ends every other process from C++: after `heartbeat_timeout_s` when a worker is gone, at
once when process 0 (which runs the runtime's coordination service) is. It prints an abort and a
stack trace; Python in that process gets no say, and no setting of JAX 0.10 changes that
(`jax_enable_recoverability` keeps workers alive on GPU only, and not when process 0 is gone).

So `python -m gpt2_jax.train` on several processes runs the trainer as a child process and waits:

- SIGTERM and SIGINT are passed on to the child (which is in its own process group, so that a
  Ctrl-C in a terminal reaches it once); the child dies with the parent (Linux: PR_SET_PDEATHSIG);
- the child's standard output is the parent's; its standard error passes through the parent, up to
  the runtime's first error report: from there on it goes to RUN_DIR/runtime-process-I.log;
- the child tells the parent its run directory and its resume command once it knows them;
- when the runtime ended the child, the parent prints which process is gone, the newest complete
  checkpoint and the command that resumes, and exits 1. Otherwise it exits with the child's status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

from gpt2_jax.launch import launched_as_several

ENV = "GPT2_JAX_SUPERVISOR_FD"  # in the child: the pipe to its parent
# The runtime's log lines (glog: severity, date, time, thread, file:line]) that start its report; a
# line starts after a newline, or after the carriage return of a progress bar's unfinished line.
RUNTIME_ERROR = re.compile(rb"(?m)(?:^|(?<=\r))[WEF]\d{4} [\d:.]+ +\d+ (coordination_service\w*|client|preemption_sync_manager)\.\w+:\d+\]")
# "...unhealthy (stopped sending heartbeats):" then one task per line: "1", or "/job:jax_worker/replica:0/task:1"
GONE_WORKERS = re.compile(r"unhealthy \(stopped sending heartbeats\):[ \t]*\n((?:[ \t]*(?:/job:\S*task:)?\d+[ \t]*\n)+)")
COORDINATOR_GONE = ("Socket closed", "Failed to send RPC to coordination service", "Connection refused", "failed to connect")


def supervised() -> bool:
    """Whether this process is a supervised trainer."""
    return ENV in os.environ


def _flags(argv: list[str]) -> dict[str, str]:
    """The values of --coordinator, --num-processes and --process-id in `argv` (both spellings)."""
    out, names = {}, ("--coordinator", "--num-processes", "--process-id")
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in names:
            out[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return out


def wanted(argv: list[str]) -> bool:
    """Whether the command line `argv` starts one process of several, not yet supervised."""
    return not supervised() and (bool(_flags(argv)) or launched_as_several())


def process_id(argv: list[str]) -> int | None:
    """--process-id's value, if given as a number."""
    value = _flags(argv).get("--process-id", "")
    return int(value) if value.isdigit() else None


def _tell(message: dict) -> None:
    fd = os.environ.get(ENV)
    if fd:
        try:
            os.write(int(fd), (json.dumps(message) + "\n").encode())
        except OSError:  # the parent is gone; the child ends with it
            pass


def tell(run_dir, resume: str) -> None:
    """In the child: tell the parent the run directory and the command that resumes the run."""
    _tell({"run_dir": str(run_dir), "resume": resume})


def tell_failed(code: int) -> None:
    """In the child: it ends with `code` and has said why (the runtime may abort it while it ends,
    when process 0 went first: that is not another failure)."""
    _tell({"failed": code})


def _die_with_parent() -> None:  # in the child, before exec
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Child:
    """The trainer process, its standard error passed through, its messages to the parent read."""

    def __init__(self, argv: list[str]):
        read_fd, write_fd = os.pipe()
        env = {**os.environ, ENV: str(write_fd)}
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env, pass_fds=(write_fd,), preexec_fn=_die_with_parent)
        os.close(write_fd)
        self.info: dict = {}
        self.diverted = bytearray()  # the runtime's report, kept out of the terminal
        self._messages = threading.Thread(target=self._read_messages, args=(read_fd,), daemon=True)
        self._messages.start()

    def _read_messages(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            for line in f:
                try:
                    self.info.update(json.loads(line))
                except ValueError:
                    pass

    def pass_stderr(self) -> None:
        """Copy the child's standard error to ours until it closes; the runtime's report diverted."""
        out, held = sys.stderr.buffer, b""
        while chunk := os.read(self.proc.stderr.fileno(), 65536):
            if self.diverted:
                self.diverted += chunk
                continue
            data = held + chunk
            m = RUNTIME_ERROR.search(data)
            if m:
                out.write(data[: m.start()])
                self.diverted += data[m.start():]
            else:  # hold a last line that may be the start of a runtime line
                cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
                tail = data[cut:]
                held = tail if re.match(rb"[WEF]\d{0,4}( |$)", tail) else b""
                out.write(data[: len(data) - len(held)])
            out.flush()
        if held:
            out.write(held)
            out.flush()


def run(argv: list[str], process_id: int | None) -> int:
    """Run the trainer `argv` (a full command line) as a supervised child; its exit status, or 1
    with the readable end when the runtime ended it."""
    child = _Child(argv)
    forward = lambda signum, _frame: child.proc.send_signal(signum)  # noqa: E731
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        child.pass_stderr()
        code = child.proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    child._messages.join(timeout=5)
    if "failed" in child.info or code >= 0:  # it ended by itself, or said why it ends
        # the runtime may abort it while it ends, when process 0 went first: not another failure
        _keep_report(child, process_id, quiet="failed" in child.info)
        return int(child.info["failed"]) if "failed" in child.info else code
    return _readable_end(child, code, process_id)


def _gone(report: str, process_id: int | None) -> str:
    """Which process the runtime's report says is gone."""
    m = GONE_WORKERS.search(report)
    if m:
        tasks = sorted({int(t) for t in re.findall(r"(\d+)[ \t]*\n", m.group(1))})
        if len(tasks) == 1:
            return f"process {tasks[0]} stopped sending heartbeats: it is gone"
        return f"processes {', '.join(map(str, tasks))} stopped sending heartbeats: they are gone"
    if process_id != 0 and any(s in report for s in COORDINATOR_GONE):
        return "process 0 (the coordinator of the run) is gone"
    return "another process of the run is gone"


def _keep_report(child: _Child, process_id: int | None, *, quiet: bool = False) -> str:
    """Write the runtime's report to RUN_DIR/runtime-process-I.log; " (its report: LOG)", or "".
    Where it cannot be written it is printed, unless `quiet` (the child said why it ended)."""
    from gpt2_jax import files, storage  # not needed by a run that ends well

    if not child.diverted:
        return ""
    if child.info.get("run_dir"):
        log = storage.path(child.info["run_dir"]) / f"runtime-process-{process_id or 0}.log"
        try:
            files.write_bytes(log, bytes(child.diverted))
            return f" (its report: {log})"
        except OSError:  # a start that failed removed its run directory
            pass
    if not quiet:
        sys.stderr.buffer.write(bytes(child.diverted))
    return ""


def _readable_end(child: _Child, code: int, process_id: int | None) -> int:
    """The last lines: what ended this process, the newest complete checkpoint, how to resume."""
    from gpt2_jax import checkpoint, storage

    me = f"process {process_id}" if process_id is not None else "this process"
    if child.diverted:
        why = _gone(child.diverted.decode(errors="replace"), process_id) + f"; the distributed runtime ended {me}"
    else:
        why = f"the trainer ({me}) was killed by {signal.Signals(-code).name}"
    lines = [f"\nerror: {why}{_keep_report(child, process_id)}"]
    run_dir = child.info.get("run_dir")
    if run_dir:
        path = storage.path(run_dir) / "checkpoints"
        steps = checkpoint.complete_steps(path)
        lines.append(f"newest complete checkpoint: step {steps[-1]} in {path}" if steps else "no complete checkpoint yet")
        lines.append(f"to resume, start every process again: {child.info['resume']}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 1
