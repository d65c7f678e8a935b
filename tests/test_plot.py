import json
import subprocess
import sys

import pytest

from gpt2_jax import plot


def _write_run(run, n=30):
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(0, n, 5):
            f.write(json.dumps({"step": s, "loss": 10 - s / 10, "lr": 1e-3 * min(1, s / 10), "tokens_per_s": 1000.0}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "val_loss": 10.5 - s / 10}) + "\n")
        f.write('{"step": 99, "loss": 1.0')  # a line cut short by a kill


def test_read_metrics_merges_and_skips(tmp_path):
    _write_run(tmp_path / "run")
    records, skipped = plot.read_metrics(tmp_path / "run")
    assert skipped == 1 and [r["step"] for r in records] == [0, 5, 10, 15, 20, 25]
    assert records[2]["val_loss"] == 9.5 and records[2]["loss"] == 9.0


def test_cli_writes_png(tmp_path):
    _write_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.plot", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert int.from_bytes(png[16:20], "big") == 1500  # three panels: no HellaSwag records
    assert "1 unreadable lines skipped" in proc.stdout


@pytest.mark.parametrize("content", [None, ""])
def test_cli_one_line_errors(tmp_path, content):
    (tmp_path / "run").mkdir()
    if content is not None:
        (tmp_path / "run" / "metrics.jsonl").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.plot", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_hellaswag_is_a_third_panel(tmp_path):
    _write_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write("\n" + "".join(json.dumps({"step": s, "hellaswag_acc_sum": 25 + s / 10, "hellaswag_acc_per_byte": 26.0,
                                            "hellaswag_acc_per_token": 24 + s / 5}) + "\n" for s in (10, 20)))
    png = plot.plot_run(tmp_path / "run").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 2000  # loss, learning rate, HellaSwag, throughput


def test_several_runs_in_one_figure(tmp_path, capsys):
    """`python -m gpt2_jax.plot RUN_A RUN_B --labels ...`: one PNG beside the runs, one legend entry per run."""
    for name in ("adamw", "muon"):
        _write_run(tmp_path / name)
    runs = [str(tmp_path / "adamw"), str(tmp_path / "muon")]
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.plot", *runs, "--labels", "AdamW lr 1e-3", "Muon lr 0.02"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {tmp_path / 'curves.png'} from 2 runs, 12 steps")
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1500
    assert not (tmp_path / "adamw" / "curves.png").exists()
    fig = plot.draw_runs(runs)  # default labels: the directories' names
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["adamw", "muon"]
    (val_a, val_m) = [line for line in fig.axes[0].get_lines() if line.get_marker() == "o"]
    assert list(val_a.get_xdata()) == [0, 10, 20] and val_a.get_color() != val_m.get_color()
    assert plot.run_labels(["a/run", "b/run"]) == ["a/run", "b/run"]  # the same name twice: the paths
    from gpt2_jax.plot.cli import main

    assert main([*runs, "--labels", "one"]) == 1
    assert capsys.readouterr().err == "error: 1 label(s) for 2 run(s): give one label per run directory\n"


def test_the_published_figure_pulls_in_neither_jax_nor_the_evaluation():
    """The plot's HellaSwag reference comes from gpt2_jax.published (numbers only), not from the
    evaluation package and its scorer."""
    code = ("import sys, gpt2_jax.published; assert 'jax' not in sys.modules; import gpt2_jax.plot; "
            "assert not [m for m in sys.modules if m.startswith('gpt2_jax.eval')]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
