"""`python -m gpt2_jax.train [EXPERIMENT] [key=value ...]`: parse, check, train, report."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from gpt2_jax import run_dir as run_dir_lib, sharding, storage
from gpt2_jax.checkpoint import CheckpointError
from gpt2_jax.config import ATTENTION_IMPLS, ConfigError, ModelConfig, parse_overrides
from gpt2_jax.data import DataError
from gpt2_jax.errors import one_line
from gpt2_jax.hlo import target
from gpt2_jax.sharding import ShardingError
from gpt2_jax.storage import StorageError
from gpt2_jax.train.config import MANAGED_MODEL_KEYS, TrainConfig, TrainingError, find_experiment, load_experiment, resolve_config
from gpt2_jax.run_dir import RunDirInUse
from gpt2_jax.train import plan, pod, supervisor
from gpt2_jax.train.loop import train


def _default_run_dir(experiment: str) -> Path:
    stamp = int(time.time())
    if jax.process_count() > 1:  # every process must agree on the directory
        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    return Path("runs") / f"{Path(experiment).stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(stamp))}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2_jax.train",
        description="Train GPT-2 on a device mesh. Example: python -m gpt2_jax.train small steps=1000 mesh=1,-1,1",
        epilog="TrainConfig keys (default): "
        + ", ".join(f"{f.name} ({'auto' if f.default == f.metadata.get('auto') else repr(f.default)})" for f in dataclasses.fields(TrainConfig))
        + ". ModelConfig keys (dataclass default; the size preset sets the shape): "
        + ", ".join(f"{f.name} ({f.default!r})" for f in dataclasses.fields(ModelConfig) if f.name not in MANAGED_MODEL_KEYS)
        + f". attention is one of {', '.join(ATTENTION_IMPLS)}: auto takes cuDNN flash attention on NVIDIA GPUs"
        " (bfloat16/float16) and the Pallas splash kernel on TPUs, XLA elsewhere; the choice is printed and"
        " recorded in config.json.",
    )
    parser.add_argument(
        "experiment", nargs="?", default="tiny",
        help="experiment name in experiments/ (tiny, small, medium, large, xl) or path to an experiment file (default tiny)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override a TrainConfig field (steps=100, lr=3e-4, mesh=2,4,1, ...) or a model shape field (n_layer=6)",
    )
    parser.add_argument("--coordinator", help="host:port of process 0, for multi-process runs without a cluster launcher")
    parser.add_argument("--num-processes", type=int, help="number of processes in a multi-process run")
    parser.add_argument("--process-id", type=int, help="this process's index in a multi-process run")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="plan and compile the step, then print the resolved config (grad_accum and remat_policy chosen), the mesh, "
             "the memory per device by kind and the FLOPs against the analytic count; nothing is allocated or written",
    )
    parser.add_argument(
        "--tpu", metavar="NAME",
        help="with --dry-run: export the train, eval and generation programs for the TPU slice NAME (v4-8, v5e-8, v5p-8, "
             "v6e-16, ...) from this machine and print their kernels, shardings, dtypes and donation, the analytic FLOPs "
             "per step at the chips' peak, and the memory per chip (XLA:TPU's own figures only with libtpu installed)",
    )
    return parser


def _configs(args) -> tuple[TrainConfig, ModelConfig]:
    """The experiment's settings with the overrides, resolved."""
    overrides = list(args.overrides)
    if "=" in args.experiment:  # only overrides were given
        overrides.insert(0, args.experiment)
        args.experiment = "tiny"
    settings = load_experiment(find_experiment(args.experiment))
    settings.update(parse_overrides(overrides))
    return resolve_config(settings)


def _for_tpu(args) -> int:
    """`--dry-run --tpu NAME`: the report of `gpt2_jax.hlo.target` for that slice."""
    try:
        tcfg, mcfg = _configs(args)
        print(target.report(tcfg, mcfg, target.tpu_slice(args.tpu), *plan.make_optimizer(tcfg, mcfg), tcfg.seq_len or mcfg.n_ctx))
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _setup(args) -> tuple[TrainConfig, ModelConfig, Path]:
    """The resolved configs and the run directory; JAX's processes joined, the mesh checked."""
    tcfg, mcfg = _configs(args)
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_s=tcfg.heartbeat_timeout_s)
    mesh = sharding.make_mesh(tcfg.mesh)  # fail fast on a bad mesh or batch
    if tcfg.grad_accum:
        sharding.check_batch(tcfg.batch_size, tcfg.grad_accum, mesh)
    run_dir = storage.path(tcfg.run_dir) if tcfg.run_dir else _default_run_dir(args.experiment)
    return tcfg, mcfg, run_dir


def _resume_command(tcfg: TrainConfig, run_dir, argv: list[str] | None) -> str:
    """The command that continues this run (the same arguments, the run directory named)."""
    again = list(argv if argv is not None else sys.argv[1:])
    if not tcfg.run_dir:
        again.append(f"run_dir={run_dir}")
    return f"python -m gpt2_jax.train {shlex.join(again)}"


def _report(final: dict, tcfg: TrainConfig, run_dir, argv: list[str] | None) -> None:
    """The run's last line (process 0): how it ended, and the command that resumes a stopped run."""
    if jax.process_index() != 0:
        return
    if final.get("stopped"):
        print(
            f"stopped by {final['stopped']} after step {final['step']}; checkpoint saved in {run_dir / 'checkpoints'}. "
            f"To resume: {_resume_command(tcfg, run_dir, argv)}"
        )
        return
    summary = f"done: {final['step']} steps, loss {final['loss']:.4f}"
    if "target_val_loss" in final:
        summary = f"done: target_val_loss={final['target_val_loss']['target']:g} reached at step {final['step']}, loss {final['loss']:.4f}"
    if "val_loss" in final:
        summary += f", val loss {final['val_loss']:.4f}"
    print(summary + f"; run dir {run_dir}")


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """The command line. `exiting` (the command line itself): the process ends when this returns,
    so what libraries report while it shuts down goes to the run's library.log too, and a
    multi-process run's trainer runs under `train.supervisor` (which reports a lost host)."""
    args = _parser().parse_intermixed_args(argv)  # flags may come before or after the overrides
    if args.tpu is not None:
        if not args.dry_run:
            print("error: --tpu NAME reports what would run on that TPU; give it with --dry-run", file=sys.stderr)
            return 2
        return _for_tpu(args)
    if exiting and supervisor.wanted(sys.argv[1:] if argv is None else argv):  # (`__main__` asks first)
        return supervisor.run([sys.executable, *sys.orig_argv[1:]], args.process_id)
    run_dir = None
    with pod.Watch() as watch:  # started once the processes joined (in `_setup`)
        try:
            tcfg, mcfg, run_dir = _setup(args)
            watch.start()
            supervisor.tell(run_dir, _resume_command(tcfg, run_dir, argv))
            final = train(tcfg, mcfg, run_dir, dry_run=args.dry_run)
        except (ConfigError, ShardingError, DataError, RunDirInUse, StorageError) as e:
            return _fail(watch, 2, str(e))
        except (TrainingError, CheckpointError, OSError) as e:  # OSError: e.g. a run directory that is not writable
            return _fail(watch, 1, str(e))
        except KeyboardInterrupt:  # a second SIGINT: no save; on a pod the others end too
            if watch.client is None:
                raise
            return _fail(watch, 130, "aborted by a second SIGINT, without saving")
        except Exception as e:
            if watch.client is None:
                raise
            traceback.print_exc()
            return _fail(watch, 1, one_line(e))
        finally:
            if exiting and run_dir is not None and _started(run_dir):
                run_dir_lib.library_logs_at_exit_to(run_dir)
            if exiting and watch.failing:  # not JAX's shutdown barrier: the others are ending
                watch.end()
    if not args.dry_run:
        _report(final, tcfg, run_dir, argv)
    return 0


def _fail(watch: pod.Watch, code: int, message: str) -> int:
    """Print the one-line error (naming this process on a pod) and tell the other processes."""
    print(f"error: process {jax.process_index()}: {message}" if watch.client is not None else f"error: {message}", file=sys.stderr)
    watch.fail(code, message)
    return code


def _started(run_dir) -> bool:
    """Whether a start of the run was recorded in `run_dir` (a failed start leaves none behind)."""
    try:
        return (storage.path(run_dir) / run_dir_lib.HISTORY_FILE).exists()
    except Exception:  # an unreachable bucket: nothing to log into
        return False
