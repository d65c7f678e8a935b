"""The parent of a multi-process run's trainer (`gpt2_jax.train.supervisor`), with small child
processes that behave as the trainer does: it passes signals and output on, keeps the runtime's
abort report out of the terminal, and ends with the readable lines when the runtime killed the child.
The real trainer under it, with real faults, is tests/test_pod_faults.py (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from gpt2_jax.train import supervisor

# What JAX 0.10's runtime prints on process 0 when process 1 stopped sending heartbeats.
REPORT = (
    "E1207 18:38:20.027632   23889 coordination_service.cc:1549] [1] Use error polling to propagate the following "
    "error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"
    "The tasks have crashed.\n"
    "F1207 18:38:20.028488   23900 client.h:80] Terminating process because the JAX distributed service detected fatal errors.\n"
    "*** Check failure stack trace: ***\n    @     0x7fa25aa40634  absl::LogMessage::SendToLog()\n"
)


# The child loads the supervisor module alone (not the trainer's package: seconds of imports).
CHILD = f"""import importlib.util, os, sys, signal, time
spec = importlib.util.spec_from_file_location("s", {supervisor.__file__!r})
s = importlib.util.module_from_spec(spec)
spec.loader.exec_module(s)
"""


def _run(tmp_path, body: str, capfd, process_id=0) -> tuple[int, str, str]:
    """supervisor.run on a child running `body` (the supervisor module importable as `s`)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD + textwrap.dedent(body))
    code = supervisor.run([sys.executable, str(script)], process_id)
    out, err = capfd.readouterr()
    return code, out, err


def test_a_child_killed_by_the_runtime_ends_with_the_readable_lines(tmp_path, capfd):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)  # a complete step (local: renamed into place)
    code, out, err = _run(tmp_path, f"""
        s.tell({str(tmp_path)!r}, "python -m gpt2_jax.train tiny run_dir=X --process-id 0")
        print("step 10 | loss 10.6", flush=True)
        sys.stderr.write("train: 3%|  | 11/400\\r" + {REPORT!r}); sys.stderr.flush()  # read at once: a report after a bar's \\r
        os.abort()
    """, capfd)
    lines = err.splitlines()
    assert code == 1 and "step 10 | loss" in out
    assert lines[-3] == f"error: process 1 stopped sending heartbeats: it is gone; the distributed runtime ended process 0 (its report: {tmp_path / 'runtime-process-0.log'})"
    assert lines[-2] == f"newest complete checkpoint: step 8 in {tmp_path / 'checkpoints'}"
    assert lines[-1] == "to resume, start every process again: python -m gpt2_jax.train tiny run_dir=X --process-id 0"
    assert "train: 3%" in err and "Check failure" not in err and "E1207" not in err
    assert (tmp_path / "runtime-process-0.log").read_text() == REPORT


def test_the_coordinator_gone_and_a_child_killed_otherwise(tmp_path, capfd):
    report = "F1207 18:24:51.757519   15419 client.h:80] Terminating process ...\n:UNKNOWN:Error received from peer  {grpc_message:\"Socket closed\"}\n"
    code, _, err = _run(tmp_path, f"""
        s.tell({str(tmp_path)!r}, "RESUME")
        sys.stderr.write({report!r}); sys.stderr.flush()
        os.abort()
    """, capfd, process_id=1)
    assert code == 1 and "error: process 0 (the coordinator of the run) is gone; the distributed runtime ended process 1" in err
    assert "no complete checkpoint yet" in err
    code, _, err = _run(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)\n", capfd, process_id=1)
    assert code == 1 and err.strip() == "error: the trainer (process 1) was killed by SIGKILL"


def test_a_child_that_failed_and_said_so_keeps_its_status_and_the_report_goes_to_the_log(tmp_path, capfd):
    code, _, err = _run(tmp_path, f"""
        s.tell({str(tmp_path)!r}, "RESUME")
        print("error: process 1: boom", file=sys.stderr, flush=True)
        s.tell_failed(2)
        sys.stderr.write({REPORT!r}); sys.stderr.flush()
        os.abort()
    """, capfd)
    assert code == 2 and err.strip() == "error: process 1: boom"
    assert (tmp_path / "runtime-process-0.log").read_text() == REPORT


def test_signals_reach_the_child_once_and_its_status_is_kept(tmp_path):
    """SIGTERM to the parent reaches the child (in its own process group); its exit status is the
    parent's. Run as a real parent process, as the command line runs it."""
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent("""
        import signal, sys, time
        got = []
        signal.signal(signal.SIGTERM, lambda *_: got.append(1))
        print("ready", flush=True)
        while not got:
            time.sleep(0.05)
        time.sleep(0.5)
        print(f"got {len(got)} SIGTERM", flush=True)
        sys.exit(7)
    """))
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD + f"sys.exit(s.run([sys.executable, {str(child)!r}], 0))"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert parent.stdout.readline().strip() == "ready"
    os.killpg(parent.pid, signal.SIGTERM)  # as a scheduler signals the job's process group
    start = time.monotonic()
    assert parent.wait(timeout=30) == 7 and time.monotonic() - start < 10
    assert parent.stdout.read().strip() == "got 1 SIGTERM"


def test_which_command_lines_are_supervised(monkeypatch):
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", supervisor.ENV):
        monkeypatch.delenv(k, raising=False)
    assert not supervisor.wanted(["small", "steps=10"])
    argv = ["small", "--coordinator", "h0:1234", "--num-processes=2", "steps=10", "--process-id", "1"]
    assert supervisor.wanted(argv) and supervisor.process_id(argv) == 1
    assert supervisor.process_id(["small", "--process-id=3"]) == 3 and supervisor.process_id(["small"]) is None
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a cluster launcher started several
    assert supervisor.wanted(["small"])
    monkeypatch.setenv(supervisor.ENV, "5")  # the supervised child itself
    assert not supervisor.wanted(argv)
