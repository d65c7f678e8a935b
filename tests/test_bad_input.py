"""Bad input never reaches JAX: typed configs, checked weights, a memory preflight, one line per
error. Each case asserts the one-line error, the exit code, and that nothing was written or changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2_jax.config import ConfigError, ModelConfig, get_model_config, parse_overrides
from gpt2_jax.convert.cli import main as convert_main
from gpt2_jax.data.sources import _building
from gpt2_jax.eval.cli import main as eval_main
from gpt2_jax.generate.cli import main as generate_main
from gpt2_jax.train.cli import main as train_main
from helpers import random_hf_gpt2


def _snapshot(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def one_line(capsys, code, expected_code, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == expected_code and len(lines) == 1, err
    assert err.strip().count("\n") == 0, err  # nothing else on stderr: no traceback
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- typed configs


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("n_embd", 256.5, "n_embd must be an integer in [1, 65536], got 256.5"),
        ("n_layer", "four", "n_layer must be an integer in [1, 4096], got 'four'"),
        ("n_head", None, "n_head must be an integer in [1, 4096], got None"),
        ("layer_norm_epsilon", "abc", "layer_norm_epsilon must be a number in (0, 1], got 'abc'"),
        ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon must be a finite number in (0, 1], got nan"),
        ("attn_pdrop", 1.5, "attn_pdrop must be a number in [0, 1), got 1.5"),
        ("n_layer", 10**9, "n_layer must be an integer in [1, 4096], got 1000000000"),
        ("scan_layers", "yes", "scan_layers must be true or false, got 'yes'"),
    ],
)
def test_model_config_checks_type_and_range(field, value, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{"n_embd": 256, "n_head": 4, field: value})
    assert str(e.value) == message


def test_integral_floats_are_integers():
    cfg = ModelConfig(n_embd=256.0, n_head=4, n_layer=2.0)  # JSON writers produce these
    assert cfg.n_embd == 256 and type(cfg.n_embd) is int and type(cfg.n_layer) is int


def test_analytic_parameter_count_is_the_trees():
    from gpt2_jax.model import count_params

    for size in ("tiny", "small", "xl"):
        cfg = get_model_config(size, pad_vocab_multiple=128)
        assert cfg.n_params == count_params(cfg, exclude_padding=False)


def test_config_cli_refuses_nonsense_at_once(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.config", "tiny", "n_layer=1000000000"], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 10  # it used to hang (killed at 200 s)
    assert proc.returncode == 2 and proc.stderr == "error: n_layer must be an integer in [1, 4096], got 1000000000\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
        (["seed=4294967296"], "seed must be an integer in [0, 4294967295], got 4294967296"),
        (["lr=nan"], "lr must be a finite number in [0, inf], got nan"),
        (["b2=1"], "b2 must be a number in [0, 1), got 1.0"),
        (["steps=4", "steps=5"], "steps is given twice (steps=4 and steps=5); give it once"),
        (["steps=4.5"], "steps must be an integer, got 4.5"),
        (["n_layer=1000000000"], "n_layer must be an integer in [1, 4096], got 1000000000"),
    ],
)
def test_train_refuses_bad_settings_before_anything_is_written(tmp_path, capsys, args, message):
    run_dir = tmp_path / "run"
    code = train_main(["tiny", *args, f"run_dir={run_dir}"])
    assert one_line(capsys, code, 2, message) == f"error: {message}"
    assert not run_dir.exists()


def test_parse_overrides_names_the_repeated_key():
    with pytest.raises(ConfigError, match="steps is given twice"):
        parse_overrides(["steps=4", "--steps=5"])


# ----------------------------------------------------------------------------- the memory preflight


def test_train_preflight_refuses_a_model_that_cannot_fit_in_under_a_second(tmp_path, capsys):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    code = train_main(["tiny", "n_layer=4000", "n_embd=4096", "n_head=32", f"run_dir={run_dir}"])
    assert time.perf_counter() - start < 1.0  # from the shapes alone: nothing is built
    line = one_line(capsys, code, 2, "needs about", "GiB per device", "but a device has", "lower batch_size=")
    assert "parameters" in line and "optimizer state" in line and "activations" in line
    assert not run_dir.exists()


def test_train_prints_its_memory_estimate(tmp_path, capsys, shared_data):
    code = train_main(["tiny", "n_layer=1", "n_embd=32", "n_head=2", "seq_len=16", "batch_size=8", "steps=1",
                       "eval_batches=1", "sample_tokens=1", f"run_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory estimate: " in out and "micro-batch: grad_accum=1 " in out and "compiled step " in out


@pytest.fixture
def hf_dir(tmp_path):
    random_hf_gpt2(tmp_path / "hf", vocab_size=101, n_positions=32, n_embd=80, n_layer=2, n_head=5)
    return tmp_path / "hf"


def test_eval_and_generate_preflights_refuse_huge_batches(tmp_path, hf_dir, capsys, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    code = eval_main(["--model", str(hf_dir), "--task", "lambada", "--data-dir", str(shared_data), "--batch-size", "100000000"])
    one_line(capsys, code, 1, "scoring batches of 100000000 rows", "lower --batch-size")
    code = generate_main(["--model", str(hf_dir), "--prompt", "hi", "--max-new-tokens", "8", "--num-samples", "100000000"])
    one_line(capsys, code, 1, "generating 100000000 row(s)", "lower --num-samples")
    assert _snapshot(tmp_path) == before  # no eval_results.json, nothing else


# ----------------------------------------------------------------------------- weights and HF configs


def _edit_config(hf_dir: Path, **changes):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def _every_loader(hf_dir: Path, capsys, *needles, extra=()):
    """`convert inspect`, `generate` and `eval` refuse the same directory with the same reason."""
    assert one_line(capsys, convert_main(["inspect", str(hf_dir), *extra]), 1, *needles)
    assert one_line(capsys, generate_main(["--model", str(hf_dir), "--prompt", "hi", "--max-new-tokens", "4", *extra]), 1, *needles)
    assert one_line(capsys, eval_main(["--model", str(hf_dir), "--task", "lambada", "--data-dir", str(hf_dir), *extra]), 1, *needles)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon must be a number in (0, 1], got 'abc'"),
        ({"n_layer": "four"}, "n_layer must be an integer in [1, 4096], got 'four'"),
        ({"n_head": None}, "n_head must be an integer in [1, 4096], got None"),
        ({"n_embd": 80.5}, "n_embd must be an integer in [1, 65536], got 80.5"),
    ],
)
def test_hf_config_fields_are_typed(hf_dir, capsys, changes, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _edit_config(hf_dir, **changes)
    before = _snapshot(tmp_path)
    _every_loader(hf_dir, capsys, message)
    assert _snapshot(tmp_path) == before


def test_hf_config_with_an_integral_float_width_loads(hf_dir, capsys):
    _edit_config(hf_dir, n_embd=80.0)
    assert convert_main(["inspect", str(hf_dir)]) == 0


def test_integer_weights_are_refused(hf_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    state["transformer.wte.weight"] = (state["transformer.wte.weight"] * 100).astype(np.int32)
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    before = _snapshot(tmp_path)
    _every_loader(hf_dir, capsys, "tensor wte.weight is stored as int32", "float32, float16 or bfloat16")
    assert _snapshot(tmp_path) == before


def test_non_finite_weights_are_counted_and_refused_unless_allowed(hf_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    state = load_file(hf_dir / "model.safetensors")
    kernel = state["transformer.h.1.mlp.c_fc.weight"]
    kernel[0, :3] = np.nan
    kernel[1, 0] = np.inf
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _every_loader(hf_dir, capsys, "1 tensor(s) hold NaN or inf values: h_1/mlp/c_fc/kernel (4)", "--allow-nonfinite")
    assert convert_main(["inspect", str(hf_dir), "--allow-nonfinite"]) == 0
    assert "h_1/mlp/c_fc/kernel (4)" in capsys.readouterr().err  # still reported, as a warning


# ----------------------------------------------------------------------------- data


def test_a_build_removes_incomplete_folders_of_killed_builds(tmp_path, capsys):
    class Builder:  # what `_building` reads of a TFDS builder
        data_path = tmp_path / "tfds" / "tiny_shakespeare" / "1.0.0"

    parent = Builder.data_path.parent
    stale = parent / "incomplete.3f2a_1.0.0"
    (stale / "x").mkdir(parents=True)
    (stale / "x" / "part.array_record").write_bytes(b"0" * 1000)
    with _building(Builder):
        assert not stale.exists()
    assert "left by a build that did not finish" in capsys.readouterr().err
    os.remove(parent / ".build.lock")


# ----------------------------------------------------------------------------- lm-evaluation-harness


@pytest.mark.parametrize("tasks", [["--tasks", "x"], []])
def test_harness_names_a_missing_model_before_lm_eval_starts(tmp_path, capsys, tasks):
    from gpt2_jax.harness.cli import main as harness_main

    missing = tmp_path / "nonexistent"
    code = harness_main(["--model", "gpt2_jax", "--model_args", f"model={missing}", *tasks])
    one_line(capsys, code, 1, f"--model_args model={missing}: {missing} does not exist", "random:SIZE")


@pytest.mark.parametrize("args,code,needles", [
    (["--model_args", "model=random:tiny"], 2, ["no tasks: pass --tasks NAME", "ls tasks"]),
    (["--tasks", "hellaswag"], 2, ["--model gpt2_jax needs --model_args model=PATH"]),
    (["--model_args", "model=random:huge", "--tasks", "hellaswag"], 1, ["model=random:huge: unknown model size 'huge'"]),
    (["--model_args", "model=random:tiny", "--tasks", "x"], 2, ["--tasks x: no such lm-eval task", "ls tasks", "--include_path"]),
])
def test_harness_settings_are_one_line(capsys, args, code, needles):
    from gpt2_jax.harness.cli import main as harness_main

    one_line(capsys, harness_main(["--model", "gpt2_jax", *args]), code, *needles)


# ----------------------------------------------------------------------------- data: raw files and token stores


def _bad_fineweb_file(path: Path, case: str) -> None:
    """A FineWeb-Edu parquet file in the released schema (test_data's writer), then spoiled."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_data import write_fineweb_parquet

    write_fineweb_parquet(path, ["one document.", "another document."], row_group_size=1)
    table = pq.read_table(path)
    if case == "int":
        table = table.set_column(table.schema.get_field_index("text"), "text", pa.array([1, 2], pa.int64()))
    elif case == "missing":
        table = table.drop_columns(["text"])
    pq.write_table(table, path, row_group_size=1)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case,needles", [
    ("int", ["column 'text' holds int64 values, expected a string column"]),
    ("missing", ["no column 'text' (has: id, dump,", "a string column 'text'"]),
    ("truncated", ["not a readable parquet file"]),
])
def test_fineweb_edu_bad_parquet_is_one_line_and_leaves_the_cache_alone(tmp_path, capsys, monkeypatch, case, needles):
    from gpt2_jax.data.__main__ import main as data_main

    monkeypatch.setenv("GPT2_JAX_OFFLINE", "1")
    bad = tmp_path / "data" / "fineweb_edu" / "sample" / "10BT" / "000_00000.parquet"
    _bad_fineweb_file(bad, case)
    cache = tmp_path / "cache"
    (cache / "tokens").mkdir(parents=True)
    (cache / "tokens" / "kept.txt").write_text("an earlier store")
    before = _snapshot(cache)
    code = data_main(["prepare", "--dataset", "fineweb_edu", "--manual-dir", str(tmp_path / "data"),
                      "--cache-dir", str(cache), "--quiet"])
    one_line(capsys, code, 1, f"error: {bad}: ", *needles)
    assert _snapshot(cache) == before  # no tfds/ folders, no .build.lock
    code = data_main(["prepare", "--dataset", "fineweb_edu", "--manual-dir", str(tmp_path / "data"),
                      "--cache-dir", str(tmp_path / "new"), "--quiet"])
    one_line(capsys, code, 1, f"error: {bad}: ", *needles)
    assert not (tmp_path / "new").exists()


@pytest.fixture
def unreachable_gcs(monkeypatch):
    """gs:// URLs pointed at a port on this machine that nobody listens on, anonymously."""
    import socket

    import fsspec

    with socket.socket() as s:  # a port on this machine that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setitem(fsspec.config.conf, "gcs", {**fsspec.config.conf.get("gcs", {}), "token": "anon"})


def test_an_unreachable_token_store_is_one_line_naming_it_in_seconds(tmp_path, capsys, unreachable_gcs):
    from gpt2_jax.data import DataError, SplitTokens
    from gpt2_jax.data.__main__ import main as data_main

    url = "gs://nobucket/x"
    start = time.perf_counter()
    code = data_main(["prepare", "--dataset", url, "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert time.perf_counter() - start < 15  # gcsfs alone retries for about a minute
    one_line(capsys, code, 1, f"error: {url}: the token store could not be reached (no answer within")
    start = time.perf_counter()
    with pytest.raises(DataError, match=f"^{url}: the token store could not be reached"):
        SplitTokens(url, "train")  # what the training loop opens for dataset=URL
    assert time.perf_counter() - start < 15
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- a failed start leaves nothing


def test_train_from_broken_weights_names_init_from_and_leaves_no_run_directory(tmp_path, hf_dir, capsys, shared_data):
    weights_file = hf_dir / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:200])  # a valid config.json beside a broken file
    run_dir = tmp_path / "run"
    code = train_main(["tiny", f"init_from={hf_dir}", "seq_len=16", "batch_size=8", "steps=1", "eval_batches=1",
                       "sample_tokens=1", f"run_dir={run_dir}"])
    one_line(capsys, code, 2, f"error: init_from={hf_dir}: ", "model.safetensors")
    assert not run_dir.exists()  # no .lock, no library.log, no folder
    run_dir.mkdir()  # an existing, empty run directory stays as it was
    code = train_main(["tiny", f"init_from={hf_dir}", "seq_len=16", "batch_size=8", "steps=1", "eval_batches=1",
                       "sample_tokens=1", f"run_dir={run_dir}"])
    one_line(capsys, code, 2, f"error: init_from={hf_dir}: ")
    assert run_dir.is_dir() and not list(run_dir.iterdir())


def test_train_on_an_unreachable_token_store_names_dataset_in_seconds(tmp_path, capsys, unreachable_gcs):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    code = train_main(["tiny", "dataset=gs://nobucket/x", "seq_len=16", "batch_size=8", "steps=1", f"run_dir={run_dir}"])
    assert time.perf_counter() - start < 20  # checked before the step is compiled
    one_line(capsys, code, 2, "error: dataset=gs://nobucket/x: the token store could not be reached")
    assert not run_dir.exists()

