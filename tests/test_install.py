"""Installing for an accelerator: setup.cfg's extras, `make install ACCEL=...` (dry runs, no network)
and the Colab notebooks' install cell. A user's install never pulls torch or other test-only
packages; only `make test` installs them, CPU torch first. Installed from a wheel, training a size by
name works from any directory: the experiment files ship in it."""

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

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


# ----------------------------------------------------------------------------- installed from a wheel


def test_setup_cfg_lists_every_package_and_ships_the_experiments():
    """setup.cfg names its packages (to map experiments/ into gpt2_jax.experiments): a package added
    under src/ and missing from that list would be left out of the wheel."""
    from setuptools import find_packages

    options = setup_cfg()["options"]
    listed = [line.strip() for line in options["packages"].splitlines() if line.strip()]
    wanted = find_packages(str(ROOT / "src")) + ["gpt2_jax.experiments"]
    assert sorted(listed) == sorted(wanted), f"setup.cfg [options] packages must list exactly {sorted(wanted)}"
    package_dir = dict(line.replace(" ", "").split("=") for line in options["package_dir"].splitlines() if line.strip())
    assert package_dir == {"": "src", "gpt2_jax.experiments": "experiments"}


def test_an_experiment_in_the_current_directory_wins(tmp_path, monkeypatch):
    from gpt2_jax.config import ConfigError
    from gpt2_jax.train import find_experiment

    assert find_experiment("tiny") == ROOT / "experiments" / "tiny.py"  # a checkout: its experiments/
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "tiny.py").write_text("CONFIG = {'steps': 7}\n")
    (tmp_path / "experiments" / "mine.py").write_text("CONFIG = {}\n")
    monkeypatch.chdir(tmp_path)
    assert find_experiment("tiny") == tmp_path / "experiments" / "tiny.py"
    with pytest.raises(ConfigError, match=r"unknown experiment 'huge'; valid: finetune, large, medium, mine, small, "):
        find_experiment("huge")


def _wheel_venv(tmp_path):
    """gpt2_jax built into a wheel from a copy of the checkout and installed, offline, into a fresh
    virtualenv; the third-party packages come from this interpreter's site-packages, named by a
    .pth file after the wheel's own (whose gpt2_jax is only the editable install's metadata)."""
    src = tmp_path / "checkout"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("src", "experiments"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    proc = run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("gpt2_jax-*.whl")
    venv = tmp_path / "venv"
    proc = run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    proc = run(*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "zz_third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.slow
def test_a_wheel_trains_a_size_by_name(tmp_path, shared_data):
    """`pip install .` then, from any directory, `python -m gpt2_jax.train small --dry-run` and a
    short tiny run: the experiment files ship in the wheel (gpt2_jax.experiments)."""
    python = _wheel_venv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(GPT2_JAX_DATA_DIR=str(shared_data), JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run([str(python), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                                       timeout=600)
    proc = run("-c", "import gpt2_jax; from gpt2_jax.train import find_experiment; "
                     "print(gpt2_jax.__file__); print(find_experiment('small'))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, small = proc.stdout.split()
    assert module.startswith(str(tmp_path / "venv")) and small.startswith(str(tmp_path / "venv")), proc.stdout
    assert small.endswith("gpt2_jax/experiments/small.py")

    proc = run("-m", "gpt2_jax.train", "small", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"dataset": "openwebtext"' in proc.stdout and "mesh: " in proc.stdout, proc.stdout[-3000:]

    run_dir = tmp_path / "run"
    proc = run("-m", "gpt2_jax.train", "tiny", "steps=2", "seq_len=32", "batch_size=4", "eval_every=0",
               "sample_tokens=2", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "config.json").is_file() and (run_dir / "final.json").is_file()
