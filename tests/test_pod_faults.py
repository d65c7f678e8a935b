"""The pod fault matrix: the trainer as 2 processes x 2 CPU devices (gloo), a fault on some of them.

SIGTERM to all, SIGINT to one, and SIGTERM to one during validation, HellaSwag or sampling: every
process stops after the same step, one checkpoint of that step is saved, every process exits 0,
process 0 prints the stop line; a second SIGINT aborts every process. A hang on one process: the watchdog ends every process with its stacks log. SIGKILL
of a worker or of process 0 (with its supervising parent, as when a machine goes): the other ends
within the heartbeat bound with the lines that name the lost process, the newest checkpoint and the
resume command. An exception on one process: every process ends within seconds, naming it. A
file-size limit on one process: each failed save is reported once by process 0, nothing hangs.
Each case then resumes, and the resume's losses equal an uninterrupted run's bit for bit. Faults are
injected as in tests/test_faults.py: the trainer runs from a small script that first wraps one
function. Each case is bounded in time (a hang fails). The time from each fault to each process's
exit is printed (`-s`). The resume on another number of processes is tests/test_resume_process_count.py,
and SIGTERM to one process with the run directory on gs:// is tests/test_storage_multihost.py.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from gpt2_jax import checkpoint as C
from gpt2_jax.train import preemption
from helpers import run_losses, pod_env
from test_train_multiprocess import _free_port

pytestmark = pytest.mark.slow

STEPS = 24
ARGS = [
    "tiny", "n_layer=1", "n_embd=48", "n_head=3", "seq_len=16", "batch_size=8", f"steps={STEPS}", "dropout=0.1",
    "eval_every=0", "eval_batches=1", "sample_tokens=1", "log_every=1", "ckpt_every=0", "mesh=2,2,1",
]
MAIN = "\nimport sys\nfrom gpt2_jax.train.cli import main\nsys.exit(main(sys.argv[1:], exiting=True))\n"
LIMIT_S = 300  # no case takes longer: a run that hangs fails here

# A validation of 1 s per batch (process 0 says when its second batch starts).
SLOW_EVAL = """
import time
import jax
from gpt2_jax.train import loop
evaluate = loop.validation_loss
def slow_evaluate(eval_step, params, batches, mesh):
    def each():
        for i, batch in enumerate(batches):
            if i == 1 and jax.process_index() == 0:
                print("SLOW EVAL", flush=True)
            time.sleep(1.0)
            yield batch
    return evaluate(eval_step, params, each(), mesh)
loop.validation_loss = slow_evaluate
"""

# HellaSwag scoring at 0.5 s a batch (process 0 says when its second batch starts).
SLOW_HELLASWAG = """
import time
import jax
from gpt2_jax.eval.scoring import Scorer
dispatch, calls = Scorer._dispatch, []
def slow_dispatch(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and jax.process_index() == 0:
        print("SLOW HELLASWAG", flush=True)
    time.sleep(0.5)
    return dispatch(self, *args, **kwargs)
Scorer._dispatch = slow_dispatch
"""

# Sampling in chunks of 8 tokens, 0.5 s before each (process 0 says when its second chunk starts).
SLOW_SAMPLING = """
import time
import jax
from gpt2_jax.generate import Generator
generate_tokens, calls = Generator.generate_tokens, []
def slow_generate_tokens(self, *args, between=None, **kwargs):
    def slow_between():
        calls.append(1)
        if len(calls) == 2 and jax.process_index() == 0:
            print("SLOW SAMPLING", flush=True)
        time.sleep(0.5)
        between()
    return generate_tokens(self, *args, between=slow_between if between else None, chunk=8, **kwargs)
Generator.generate_tokens = slow_generate_tokens
"""

# Process 1 stops in its training loop after step 6 (its main thread sleeps).
HANG = """
import time
import jax
from gpt2_jax.train import hooks
push = hooks.Meter.push
def hanging_push(self, step, metrics):
    push(self, step, metrics)
    if step == 6 and jax.process_index() == 1:
        print("HANGING", flush=True)
        time.sleep(3600)
hooks.Meter.push = hanging_push
"""

# Process 1 raises in a hook after step 6.
RAISE = """
import jax
from gpt2_jax.train import hooks
push = hooks.Meter.push
def raising_push(self, step, metrics):
    push(self, step, metrics)
    if step == 6 and jax.process_index() == 1:
        raise RuntimeError("injected failure in a hook")
hooks.Meter.push = raising_push
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_data):
    return pod_env(shared_data, tmp_path_factory.mktemp("cache"))


def _args(extra) -> list[str]:
    """ARGS with `extra` key=value settings replacing those of the same key."""
    settings = dict(a.split("=", 1) for a in ARGS[1:])
    settings.update(a.split("=", 1) for a in extra)
    return [ARGS[0]] + [f"{k}={v}" for k, v in settings.items()]


class Pod:
    """Two trainer processes; each one's output collected by a thread, waited for with a bound."""

    def __init__(self, run_dir, env, *extra, code: str | None = None, file_limit: dict[int, int] | None = None):
        port = _free_port()
        limits = file_limit or {}

        def limit(i):  # a file-size limit on process i (its writes beyond it fail with EFBIG)
            return (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limits[i], limits[i]))) if i in limits else None

        cmd = [sys.executable, "-m", "gpt2_jax.train"] if code is None else [sys.executable, "-c", code]
        self.procs = [
            subprocess.Popen(
                cmd + [*_args(extra), f"run_dir={run_dir}", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                       "--process-id", str(i)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
                preexec_fn=limit(i),
            )
            for i in range(2)
        ]
        self.lines: list[list[str]] = [[], []]
        self.seen: dict[str, float] = {}  # marker -> when a process printed it
        self.step_at: dict[int, float] = {}  # step -> when process 0 logged its loss
        self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(2)]
        for t in self._readers:
            t.start()
        self.start = time.monotonic()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            self.lines[i].append(line)
            for marker in ("HANGING",):
                if marker in line:
                    self.seen.setdefault(marker, time.monotonic())
            if i == 0 and (m := re.search(r"step +(\d+) \| loss", line)):
                self.step_at[int(m.group(1))] = time.monotonic()

    def out(self, i: int) -> str:
        return "".join(self.lines[i])

    def wait_for(self, pattern: str, i: int = 0) -> None:
        """Until process `i` printed `pattern` (a regular expression)."""
        while not re.search(pattern, self.out(i)):
            assert time.monotonic() - self.start < LIMIT_S and self.procs[0].poll() is None, self.out(0)[-3000:]
            time.sleep(0.05)

    def signal(self, which, sig=signal.SIGTERM) -> float:
        for i in which:
            os.kill(self.procs[i].pid, sig)
        return time.monotonic()

    def finish(self) -> list[tuple[int, float]]:
        """(exit status, when it exited) of each process; both killed if one runs past the limit."""
        ended = [None, None]
        while None in ended:
            for i, p in enumerate(self.procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = (p.returncode, time.monotonic())
            if time.monotonic() - self.start > LIMIT_S:
                for p in self.procs:
                    os.killpg(p.pid, signal.SIGKILL)
                pytest.fail(f"the pod did not end within {LIMIT_S} s:\n{self.out(0)[-2000:]}\n{self.out(1)[-2000:]}")
            time.sleep(0.02)
        for t in self._readers:
            t.join(timeout=10)
        return ended


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("reference")
    pod = Pod(run_dir, env)
    ended = pod.finish()
    assert [code for code, _ in ended] == [0, 0], pod.out(0)[-3000:] + pod.out(1)[-3000:]
    print(f"\nthe uninterrupted run: from its last step's log line to the exit (the final save and the shutdown) "
          f"{ended[0][1] - pod.step_at[STEPS]:.2f} s (process 0), {ended[1][1] - pod.step_at[STEPS]:.2f} s (process 1)")
    losses = run_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _stopped_then_resumed(tmp_path, env, reference, pod: Pod, signalled_at: float, what: str, *extra: str,
                          sig: str = "SIGTERM", resume: bool = True) -> int:
    """The stop's checks (every process 0, one checkpoint of the step process 0 names), then (with
    `resume`) the resume's losses against the reference; returns the step."""
    ended = pod.finish()
    assert [code for code, _ in ended] == [0, 0], pod.out(0)[-3000:] + pod.out(1)[-3000:]
    stops = re.findall(rf"stopped by {sig} after step (\d+); checkpoint saved in (\S+)\. To resume: ", pod.out(0))
    assert len(stops) == 1 and stops[0][1] == str(tmp_path / "checkpoints"), pod.out(0)[-3000:]
    assert "stopped by" not in pod.out(1)
    step = int(stops[0][0])
    times = [t - signalled_at for _, t in ended]
    before = max(s for s, t in pod.step_at.items() if t <= signalled_at)
    print(f"\n{what}: signal to exit {times[0]:.2f} s (process 0), {times[1]:.2f} s (process 1); the signal came after "
          f"step {before}'s log line, the run stopped after step {step}, whose loss was logged {pod.step_at[step] - signalled_at:.2f} s "
          f"after the signal; median step {statistics.median(b - a for a, b in zip(pod.step_at.values(), list(pod.step_at.values())[1:])):.2f} s")
    assert 0 < step < STEPS and C.complete_steps(tmp_path / "checkpoints") == [step]
    # The bound in steps: the first poll after the signal is at most two past `before`'s log line (the
    # line is printed as step `before` + 1 is dispatched), one more if this test read the next line
    # late, and the stop comes LAG polls after it.
    assert step <= before + 3 + preemption.LAG
    assert "Traceback" not in pod.out(0) + pod.out(1)
    if resume:
        _resumes_exactly(tmp_path, env, reference, step, *extra)
    return step


def _resumes_exactly(run_dir, env, reference, step: int | None, *extra: str) -> None:
    """Both processes started again: the run resumes from `step` (None: starts afresh) and its
    losses equal the uninterrupted run's, every step, bit for bit."""
    resumed = Pod(run_dir, env, *extra)
    assert [code for code, _ in resumed.finish()] == [0, 0], resumed.out(0)[-3000:] + resumed.out(1)[-3000:]
    assert (f"resumed from checkpoint step {step}" in resumed.out(0)) if step else ("resumed from" not in resumed.out(0))
    assert run_losses(run_dir) == reference


def _errors(text: str) -> list[str]:
    """The error lines of a process's output (also where one follows a progress bar's unfinished line)."""
    return [line[line.index("error:"):].strip() for line in text.splitlines() if "error:" in line]


def test_sigterm_to_every_process_stops_them_at_the_same_step(tmp_path, env, reference):
    """(SIGTERM to one process is tests/test_storage_multihost.py's case on a bucket; a first SIGINT
    to one, below, takes the same path.)"""
    pod = Pod(tmp_path, env)
    pod.wait_for(r"step +6 \| loss")
    at = pod.signal((0, 1))
    step = _stopped_then_resumed(tmp_path, env, reference, pod, at, "SIGTERM to (0, 1)")
    assert step >= 6


def test_sigint_to_one_process_stops_the_pod_and_a_second_one_aborts_it(tmp_path, env, reference):
    """Ctrl-C as a user gives it to the command line (its supervising parent passes it on): one
    SIGINT stops the pod like SIGTERM (whose resume the other cases check); a second one, before the
    agreed stop, ends every process at once with status 130 and no save, each naming the process;
    the run resumes from its last periodic checkpoint."""
    pod = Pod(tmp_path / "once", env)
    pod.wait_for(r"step +6 \| loss")
    at = pod.signal((1,), signal.SIGINT)
    step = _stopped_then_resumed(tmp_path / "once", env, reference, pod, at, "SIGINT to process 1", sig="SIGINT", resume=False)
    assert step >= 6

    pod = Pod(tmp_path / "twice", env, "ckpt_every=4")
    pod.wait_for(r"step +5 \| loss")
    pod.signal((1,), signal.SIGINT)
    pod.wait_for("SIGINT received", 1)  # (two signals before its handler runs would count as one)
    at = pod.signal((1,), signal.SIGINT)
    ended = pod.finish()
    print(f"\ntwo SIGINTs to process 1: second signal to exit {ended[0][1] - at:.2f} s (process 0), {ended[1][1] - at:.2f} s (process 1)")
    assert [code for code, _ in ended] == [130, 130], pod.out(0)[-3000:] + pod.out(1)[-3000:]
    assert all(t - at < 10 for _, t in ended)
    assert _errors(pod.out(0)) == ["error: process 1 failed: aborted by a second SIGINT, without saving"], pod.out(0)[-3000:]
    assert _errors(pod.out(1)) == ["error: process 1: aborted by a second SIGINT, without saving"], pod.out(1)[-3000:]
    assert "stopped by" not in pod.out(0) and "Traceback" not in pod.out(0) + pod.out(1)
    newest = C.complete_steps(tmp_path / "twice" / "checkpoints")[-1]
    assert newest == 4, pod.out(0)[-3000:]
    _resumes_exactly(tmp_path / "twice", env, reference, newest, "ckpt_every=4")


# Periodic work that a stop cuts short, made slow so that the signal (to process 1) lands inside it:
# a 20-batch validation (1 s a batch), and a 255-token sample (32 chunks of 8, 0.5 s a chunk). It
# ends at the same batch or chunk everywhere, and the step is saved (a cut sample is not written).
CUT_SHORT = {
    "validation": (("eval_every=8", "eval_batches=20"), SLOW_EVAL, "SLOW EVAL", "the validation"),
    "sampling": (("sample_every=8", "sample_tokens=255"), SLOW_SAMPLING, "SLOW SAMPLING", "sampling"),
}


@pytest.mark.parametrize("work", list(CUT_SHORT))
def test_sigterm_during_periodic_work_cuts_it_short(tmp_path, env, reference, work):
    extra, code, started, named = CUT_SHORT[work]
    pod = Pod(tmp_path, env, *extra, code=code + MAIN)
    pod.wait_for(started)
    at = pod.signal((1,))
    step = _stopped_then_resumed(tmp_path, env, reference, pod, at, f"SIGTERM to process 1 during {named}", *extra)
    assert step == 8 and f"SIGTERM: {named} cut short" in pod.out(0), pod.out(0)[-3000:]
    assert work != "sampling" or "| sample:" not in pod.out(0), pod.out(0)[-3000:]


def test_sigterm_during_hellaswag_scoring_cuts_it_short(tmp_path, env, reference):
    """SIGTERM to process 0 while every process scores 40 HellaSwag items (20 batches): the scoring
    ends at the same batch everywhere and the step is saved."""
    from helpers import HELLASWAG_ITEMS, write_hellaswag

    data = tmp_path.parent / f"{tmp_path.name}-data"
    write_hellaswag(data, HELLASWAG_ITEMS * 10)
    (data / "tiny_shakespeare").symlink_to(os.path.join(env["GPT2_JAX_DATA_DIR"], "tiny_shakespeare"))
    env = {**env, "GPT2_JAX_DATA_DIR": str(data)}
    extra = ("hellaswag_every=8",)
    pod = Pod(tmp_path, env, *extra, code=SLOW_HELLASWAG + MAIN)
    pod.wait_for("SLOW HELLASWAG")
    at = pod.signal((0,))
    step = _stopped_then_resumed(tmp_path, env, reference, pod, at, "SIGTERM to process 0 during HellaSwag scoring", *extra)
    assert step == 8 and "SIGTERM: HellaSwag scoring cut short" in pod.out(0), pod.out(0)[-3000:]


def test_a_hang_on_one_process_ends_every_process_with_its_stacks(tmp_path, env, reference):
    pod = Pod(tmp_path, env, "hang_timeout_s=5", code=HANG + MAIN)
    ended = pod.finish()
    assert "HANGING" in pod.out(1)
    after = [t - pod.seen["HANGING"] for _, t in ended]
    print(f"\nhang (hang_timeout_s=5): hang to exit {after[0]:.2f} s (process 0), {after[1]:.2f} s (process 1)")
    for i, (code, _) in enumerate(ended):
        errors = [line for line in pod.out(i).splitlines() if line.startswith("error:")]
        log = tmp_path / f"stacks-process-{i}.log"
        assert code == 3 and len(errors) == 1 and str(log) in errors[0], pod.out(i)[-3000:]
        stacks = log.read_text()
        assert "Thread" in stacks and "File " in stacks
    assert "hanging_push" in (tmp_path / "stacks-process-1.log").read_text()  # where process 1's main thread was
    assert all(4 <= t < 5 + 15 for t in after)  # about the bound (its clock starts at the last step), then the wait for the peer
    _resumes_exactly(tmp_path, env, reference, None)  # (no checkpoint was due yet: the run starts again)


@pytest.mark.parametrize("victim", [1, 0], ids=["sigkill-of-a-worker", "sigkill-of-the-coordinator"])
def test_a_dead_process_ends_the_others_readably(tmp_path, env, reference, victim):
    """Process 1 (or process 0, which hosts the runtime's coordination service) is SIGKILLed with
    its parent, as when its machine goes: the other ends within the heartbeat bound, its last lines
    naming the process that is gone, the newest complete checkpoint and the command that resumes
    (the runtime's abort and stack trace go to runtime-process-I.log); the resume is exact."""
    pod = Pod(tmp_path, env, "ckpt_every=4", "heartbeat_timeout_s=10")
    pod.wait_for(r"step +10 \| loss")
    os.killpg(pod.procs[victim].pid, signal.SIGKILL)
    at = time.monotonic()
    ended = pod.finish()
    other = 1 - victim
    code, t = ended[other]
    print(f"\nSIGKILL of process {victim}: process {other} ended {t - at:.2f} s later (heartbeat_timeout_s=10)")
    lines = [line for line in pod.out(other).splitlines() if line.strip()]
    gone = "process 1 stopped sending heartbeats: it is gone" if victim == 1 else "process 0 (the coordinator of the run) is gone"
    assert code == 1 and t - at < 10 + 20, pod.out(other)[-3000:]
    assert gone in lines[-3] and f"runtime-process-{other}.log" in lines[-3], lines[-3:]
    step = C.complete_steps(tmp_path / "checkpoints")[-1]
    assert lines[-2] == f"newest complete checkpoint: step {step} in {tmp_path / 'checkpoints'}", lines[-3:]
    assert lines[-1].startswith("to resume, start every process again: python -m gpt2_jax.train tiny ") and f"--process-id {other}" in lines[-1]
    assert "Check failure stack trace" not in pod.out(other) and "Check failure" in (tmp_path / f"runtime-process-{other}.log").read_text()
    _resumes_exactly(tmp_path, env, reference, step, "ckpt_every=4")


def test_an_exception_on_one_process_ends_every_process_with_its_reason(tmp_path, env, reference):
    pod = Pod(tmp_path, env, "ckpt_every=4", code=RAISE + MAIN)
    ended = pod.finish()
    raised_at = pod.step_at[6]
    print(f"\nan exception on process 1 after step 6: exits {ended[0][1] - raised_at:.2f} s (process 0) and "
          f"{ended[1][1] - raised_at:.2f} s (process 1) after step 6's log line")
    assert [code for code, _ in ended] == [1, 1], pod.out(0)[-3000:] + pod.out(1)[-3000:]
    assert _errors(pod.out(0)) == ["error: process 1 failed: RuntimeError: injected failure in a hook"], pod.out(0)[-3000:]
    assert _errors(pod.out(1)) == ["error: process 1: RuntimeError: injected failure in a hook"], pod.out(1)[-3000:]
    assert all(t - raised_at < 30 for _, t in ended)
    _resumes_exactly(tmp_path, env, reference, C.complete_steps(tmp_path / "checkpoints")[-1], "ckpt_every=4")


def test_a_write_failure_on_one_process_fails_that_save_on_every_process(tmp_path, env, reference):
    """Process 1 cannot write a file beyond 64 KiB (its part of every checkpoint fails): process 0
    reports each failed save once, naming process 1 and the cause; both train on (the policy of one
    host) and both end with status 1, as the last step's checkpoint was not saved. Nothing hangs."""
    pod = Pod(tmp_path, env, "ckpt_every=8", file_limit={1: 64 * 1024})
    ended = pod.finish()
    assert [code for code, _ in ended] == [1, 1], pod.out(0)[-3000:] + pod.out(1)[-3000:]
    reports = [e for e in _errors(pod.out(0)) if "was NOT saved" in e]
    assert [int(re.search(r"step (\d+)", e).group(1)) for e in reports] == [8, 16, 24], _errors(pod.out(0))
    assert all("NOT saved: process 1: " in e and "File too large" in e for e in reports), reports
    assert not [e for e in _errors(pod.out(1)) if "was NOT saved" in e]
    # Both processes fail alike at the end: process 0 says so itself, or first reads process 1's post.
    assert re.match(r"error: process (0: |1 failed: )the checkpoint of step 24 was not saved", _errors(pod.out(0))[-1]), _errors(pod.out(0))
    assert C.complete_steps(tmp_path / "checkpoints") == [] and "Traceback" not in pod.out(0) + pod.out(1)
    _resumes_exactly(tmp_path, env, reference, None)
