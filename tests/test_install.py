"""Installing for an accelerator: setup.cfg's extras, `make install ACCEL=...` (dry runs, no network)
and the Colab notebooks' install cell. A user's install never pulls torch or other test-only
packages; only `make test` installs them, CPU torch first."""

import configparser
import importlib.util
import os
import subprocess

import nbformat
import pytest
from conftest import ROOT
from packaging.requirements import Requirement

TEST_ONLY = {"torch", "transformers", "pytest", "pytest-xdist", "hypothesis", "nbclient", "nbformat", "ipykernel"}
# gpt2_jax extra -> the jax extra it must name.
ACCEL_EXTRAS = {"cuda": "cuda12", "cuda13": "cuda13", "tpu": "tpu"}


def requirements(value: str) -> list[Requirement]:
    return [Requirement(line) for line in value.splitlines() if line.strip()]


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


def make(*args: str) -> subprocess.CompletedProcess:
    """`make ARGS` at the repository root, free of an enclosing make's flags and of a user's ACCEL."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ACCEL")}
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_user_requirements_hold_no_test_only_package():
    cfg = setup_cfg()
    extras = cfg["options.extras_require"]
    assert TEST_ONLY <= {r.name for r in requirements(extras["test"])}  # the parser sees them where they are
    for section, value in [("install_requires", cfg["options"]["install_requires"])] + [
            (f"extra {name}", extras[name]) for name in ACCEL_EXTRAS]:
        names = {r.name.lower() for r in requirements(value)}
        assert not names & TEST_ONLY, f"setup.cfg {section} needs test-only packages {names & TEST_ONLY}"


def test_harness_extra_is_lm_eval():
    """`pip install -e ".[harness]"`: lm-evaluation-harness alone (the adapter needs nothing else),
    and the test extra has it too, for tests/test_harness.py."""
    extras = setup_cfg()["options.extras_require"]
    assert [r.name for r in requirements(extras["harness"])] == ["lm-eval"]
    assert "lm-eval" in {r.name for r in requirements(extras["test"])}


def test_object_store_extras():
    """`pip install -e ".[tpu,gcs]"` / `".[s3]"`: the fsspec file system of each store, and the test
    extra has both plus the local servers tests/test_storage*.py run against."""
    extras = setup_cfg()["options.extras_require"]
    assert [r.name for r in requirements(extras["gcs"])] == ["gcsfs"]
    assert [r.name for r in requirements(extras["s3"])] == ["s3fs"]
    assert {"gcsfs", "s3fs", "gcp-storage-emulator", "moto"} <= {r.name for r in requirements(extras["test"])}
    assert {"gcsfs", "s3fs"}.isdisjoint(r.name for r in requirements(setup_cfg()["options"]["install_requires"]))


def test_accelerator_extras_name_jax_extras():
    extras = setup_cfg()["options.extras_require"]
    assert set(ACCEL_EXTRAS) <= set(extras)
    for name, jax_extra in ACCEL_EXTRAS.items():
        reqs = requirements(extras[name])
        assert [(r.name, r.extras) for r in reqs] == [("jax", {jax_extra})], f"gpt2_jax[{name}]: {extras[name]!r}"


@pytest.mark.parametrize("accel", ["cpu", "cuda", "cuda13", "tpu"])
def test_make_install_installs_the_extra_and_never_torch(accel, tmp_path):
    proc = make("-n", "install", f"ACCEL={accel}", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode == 0, proc.stderr
    spec = '"."' if accel == "cpu" else f'".[{accel}]"'
    assert f"pip install -e {spec}" in proc.stdout, proc.stdout
    assert f"-m venv {tmp_path / 'venv'}" in proc.stdout  # a fresh venv is created first
    for word in ("torch", "[test]", "test-deps"):
        assert word not in proc.stdout, f"make install ACCEL={accel} runs {word}:\n{proc.stdout}"


def test_make_install_defaults_to_cpu():
    proc = make("-n", "install")
    assert proc.returncode == 0, proc.stderr
    assert 'pip install -e "."' in proc.stdout and "torch" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("target", ["test", "test-slow"])
def test_make_test_installs_cpu_torch_before_the_test_extra(target, tmp_path):
    venv = tmp_path / "venv"
    lines = make("-n", target, f"VENV={venv}").stdout.splitlines()

    def first(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert found, f"make -n {target} never runs {text!r}:\n" + "\n".join(lines)
        return found[0]

    assert first('pip install "torch==') < first('pip install -e ".[test]"') < first("-m pytest")
    assert first(f"touch {venv}/.test-deps") < first("-m pytest")


def test_make_test_skips_installed_test_deps(tmp_path):
    """Once the stamp is newer than setup.cfg, `make test` goes straight to pytest."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".test-deps").touch()
    out = make("-n", "test", f"VENV={venv}").stdout
    assert "-m pytest" in out and "pip install" not in out, out


def test_unknown_accel_is_one_line_error(tmp_path):
    proc = make("-n", "install", "ACCEL=bogus", f"VENV={tmp_path / 'venv'}")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ACCEL=bogus" in lines[0], proc.stderr
    assert all(a in lines[0] for a in ("cpu", "cuda", "tpu")), proc.stderr


def test_make_help_lists_accel():
    out = make("help").stdout
    assert "ACCEL=cpu" in out and "cuda" in out and "tpu" in out, out


def test_notebook_install_cell_installs_the_tpu_extra(monkeypatch):
    """Run each notebook's install cell with gpt2_jax made to look missing and pip intercepted."""
    calls = []
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt2_jax" else find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.delenv("GPT2_JAX_ACCEL", raising=False)
    monkeypatch.delenv("GPT2_JAX_SOURCE", raising=False)
    sources = set()
    for name in ("train", "evaluate", "sample"):
        source = nbformat.read(ROOT / "experiments" / f"{name}.ipynb", as_version=4).cells[1].source
        sources.add(source)
        calls.clear()
        namespace = {}
        exec(source, namespace)
        assert len(calls) == 1 and calls[0][-1] == "/content/gpt2_jax[tpu]", f"{name}: {calls}"
    assert len(sources) == 1, "the three notebooks' install cells differ"

    with_extra = namespace["with_extra"]
    assert with_extra(str(ROOT), "") == str(ROOT)
    assert with_extra(str(ROOT), "cuda") == f"{ROOT}[cuda]"
    url = "git+https://example.org/gpt2_jax@v1"
    assert with_extra(url, "tpu") == f"gpt2_jax[tpu] @ {url}"
    assert with_extra(f"gpt2_jax @ {url}", "tpu") == f"gpt2_jax[tpu] @ {url}"
    assert with_extra("gpt2_jax[tf]>=0.1", "tpu") == "gpt2_jax[tf,tpu]>=0.1"
