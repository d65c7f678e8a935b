"""The hang watchdog on one process (the pod case is tests/test_pod_faults.py, slow): its automatic
bound, what it does not count, and a hang that ends the process with its stacks log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from gpt2_jax.train import watchdog as W


def test_the_automatic_bound_is_a_multiple_of_the_median_step_never_under_the_minimum(tmp_path):
    dog = W.Watchdog(tmp_path)
    assert dog.bound() == W.AUTO_MIN_S  # no step yet
    dog._steps.extend([1.0, 2.0, 30.0])
    assert dog.bound() == W.AUTO_MIN_S  # 50 x the median, 2 s: 100 s, under the minimum
    dog._steps.extend([20.0, 20.0])
    assert dog.bound() == W.AUTO_STEPS * 20.0  # 1000 s: above the minimum
    assert W.Watchdog(tmp_path, timeout_s=7.5).bound() == 7.5  # a setting wins


def test_the_first_step_and_periodic_work_are_not_counted(tmp_path):
    dog = W.Watchdog(tmp_path, timeout_s=1.0)
    assert dog._last is None  # not armed before the first step ends (its compilation)
    dog.beat()
    with dog.paused():
        assert dog._last is None
        time.sleep(0.05)
    assert dog._last is not None and time.monotonic() - dog._last < 0.05  # the clock restarted
    dog.beat()
    assert list(dog._steps) and dog._steps[-1] < 0.05  # the paused time is not a step's


def test_a_hang_ends_the_process_with_its_stacks(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from gpt2_jax.train.watchdog import Watchdog
        def stuck_in_a_step():
            time.sleep(60)
        with Watchdog({str(tmp_path)!r}, timeout_s=1.0) as dog:
            dog.beat()
            stuck_in_a_step()
    """)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    log = tmp_path / "stacks-process-0.log"
    assert done.returncode == W.EXIT_CODE, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: process 0: no training step finished in 1 s (hang_timeout_s=1, bound 1 s); "
                      f"the stack traces of every thread are in {log}"], done.stderr[-2000:]
    assert "stuck_in_a_step" in log.read_text()
    assert time.monotonic() - start < 60
