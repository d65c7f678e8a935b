"""Checkpoints with Orbax: full training checkpoints that never lose a run, and params-only ones.

Training checkpoints live in `RUN_DIR/checkpoints/<step>/`, written by an Orbax `CheckpointManager`
with the `args.Composite` API. Each step directory holds these items:

  params/     the model parameters (Orbax PyTree, sharded arrays)
  opt_state/  the optimizer state
  train/      the other train-state fields: `step`, `rng`
  data/       every process's data iterator state (JSON, from `TrainLoader.get_state()`)
  config/     the resolved run config (JSON)
  structure/  shape, dtype and mesh partitioning of every leaf (JSON; read without touching arrays)
  metrics/    the metrics at that step (JSON, written by Orbax)

Saves are asynchronous. On a local disk Orbax writes each one into `<step>.orbax-checkpoint-tmp`
and renames it when complete; on an object store (a gs:// or s3:// run directory, which has no
rename) it writes `<step>/` directly and marks it complete with a last object, `commit_success.txt`.
Either way a process killed at any moment leaves only complete steps plus an unfinished one that the
next run deletes. Old checkpoints are deleted by *this* module, and only
once a newer one is complete on disk: a failed or interrupted save never costs an earlier one.

A params-only checkpoint is a directory holding `config.json` (the `ModelConfig`) and `params/`
(an Orbax PyTree checkpoint); `gpt2_jax.weights` writes and reads it through the params-item
functions below. Loading a model from any of these is `gpt2_jax.weights.load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gc
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as ocm
from orbax.checkpoint._src.path import atomicity as ocp_atomicity

from gpt2_jax import files, storage
from gpt2_jax.sharding import fit_spec

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
# Composite item names. "metrics" is reserved by Orbax, which writes it itself.
ARRAY_ITEMS = ("params", "opt_state", "train")
JSON_ITEMS = ("data", "config", "structure")
ITEM_NAMES = ARRAY_ITEMS + JSON_ITEMS
BEST_METRIC = "val_loss"  # lower is better


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or of the wrong kind."""


class IncompatibleCheckpoint(CheckpointError):
    """A readable checkpoint that another kind of run saved (model shape, optimizer, data order):
    not damage, so nothing on disk is touched."""


def warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Params items (what `gpt2_jax.weights` reads and writes; it decides what a path holds)
# --------------------------------------------------------------------------------------------


def save_params_dir(params_dir, params: Any) -> None:
    """Write a params tree as an Orbax PyTree directory (host copies of the arrays); `params_dir`
    may be a gs:// or s3:// URL."""
    params_dir = storage.path(params_dir)
    _check_orbax_can_write(params_dir)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(), **_orbax_path_options(params_dir))
    ckptr.save(params_dir, args=ocp.args.StandardSave(jax.tree.map(np.asarray, params)))  # synchronous
    ckptr.close()


def restore_params_dir(params_dir: Path, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Restore an Orbax PyTree directory onto `sharding` (default: this process's first device).

    The target is built from the saved metadata, so the device count at save time does not matter.
    The directory is read with the PyTree handler itself: in a training checkpoint it is one item
    of a step, without the step-level metadata file that a `Checkpointer` looks for.
    """
    params_dir = storage.path(params_dir)
    _check_orbax_can_write(params_dir)
    handler = ocp.PyTreeCheckpointHandler()
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        tree = handler.metadata(params_dir).tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return handler.restore(params_dir, args=args)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"{params_dir}: cannot be restored ({type(e).__name__}: {short_error(e)})") from e
    finally:
        handler.close()


WARNINGS_LOG = "warnings.log"


def cause(e: BaseException, limit: int = 180) -> str:
    """The cause of an error in one short line: its type and its message, whose middle is cut when
    long (storage errors put the path first and the OS error last)."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if len(text) <= limit:
        return text
    head = limit * 2 // 5
    return f"{text[:head]} ... {text[-(limit - head - 5):]}"


def _details(e: BaseException) -> str:
    """Everything about an error, for the warnings log: the chain of causes with their tracebacks."""
    return "".join(traceback.format_exception(e))


def short_error(e: BaseException) -> str:
    """One line of an exception's message; long TensorStore messages keep their tail (the OS error)."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    return text if len(text) <= 300 else f"{text[:120]} ... {text[-170:]}"


def checkpoints_dir_of(path) -> Path | None:
    """`path`'s checkpoints folder if `path` is a run directory or that folder itself."""
    path = storage.path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR
    if path.name == CHECKPOINTS_DIR and path.is_dir():
        return path
    return None


COMMIT_FILE = ocp_atomicity.COMMIT_SUCCESS_FILE  # the last object of a complete step on an object store


def complete_steps(checkpoints_dir) -> list[int]:
    """Steps with a complete directory (renamed into place; on an object store, holding its
    commit marker), ascending."""
    if not checkpoints_dir.is_dir():
        return []
    remote = storage.is_url(checkpoints_dir)
    return sorted(int(p.name) for p in checkpoints_dir.iterdir()
                  if p.name.isdigit() and p.is_dir() and (not remote or (p / COMMIT_FILE).exists()))


def _unfinished(checkpoints_dir) -> list:
    """Folders of saves that never completed: Orbax's temporary folders, and on an object store step
    folders without their commit marker."""
    if not checkpoints_dir.is_dir():
        return []
    remote = storage.is_url(checkpoints_dir)
    return [p for p in sorted(checkpoints_dir.iterdir())
            if TMP_SUFFIX in p.name or (remote and p.name.isdigit() and not (p / COMMIT_FILE).exists())]


def _orbax_path_options(directory) -> dict:
    """Where a checkpoint goes to an object store: complete when its commit marker is written
    (object stores have no rename), which Orbax also picks itself for gs://."""
    return {"temporary_path_class": ocp_atomicity.CommitFileTemporaryPath} if storage.is_url(directory) else {}


def _check_orbax_can_write(directory) -> None:
    """Refuse checkpoints at s3:// URLs: Orbax 0.12 builds its tensorstore paths with
    `os.path.normpath`, which turns `s3://bucket/x` into the local folder `s3:/bucket/x`, so the arrays
    would land on this host's disk. gs:// goes through tensorstore's GCS driver."""
    if storage.scheme(str(directory)) == "s3":
        raise CheckpointError(
            f"{directory}: Orbax {ocp.__version__} cannot write or read checkpoints on s3:// (its array paths lose the "
            "scheme and land on local disk); keep checkpoints on gs:// or a local or mounted path (run_dir=, "
            "init_from=, --model); token stores, reports and HF weights may be on s3://"
        )


def read_json_item(step_dir: Path, name: str) -> Any:
    """A JSON item (`config`, `data`, `structure`, `metrics`) of a step directory, or None if absent."""
    item = step_dir / name
    if not item.is_dir():
        return None
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler(filename=_json_filename(name))).restore(item)
    except Exception as e:  # a damaged or truncated JSON file
        raise CheckpointError(f"{item}: cannot be read ({type(e).__name__}: {short_error(e)})") from e


def _json_filename(name: str) -> str:
    # Orbax's JSON handler stores its object in a file named "metadata"; the metrics item that the
    # CheckpointManager writes names its file "metrics".
    return "metrics" if name == "metrics" else "metadata"


# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """When to save and what to keep."""

    every: int = 1000  # save every N steps (and always at the end)
    keep: int = 3  # keep the latest K complete checkpoints ...
    keep_best: int = 1  # ... and the best M by validation loss
    async_save: bool = True
    # zstd on the array chunks: float weights and moments shrink only ~7%, while compressing doubles
    # the CPU time of a save, time that the host takes away from training on a CPU machine.
    compress: bool = False


class Restored(NamedTuple):
    """What `restore` returns."""

    step: int
    state: Any
    data_states: list[dict] | None  # the data iterator state of each process that saved, in order
    config: dict | None
    metrics: dict | None

    @property
    def data_state(self) -> dict | None:
        """This process's data iterator state (None if none was saved). A run saved by another
        number of processes read its data in another order, so its position cannot carry over."""
        if not self.data_states:
            return None
        n = jax.process_count()
        if len(self.data_states) != n:
            raise CheckpointError(
                f"checkpoint step {self.step} was saved by {len(self.data_states)} process(es) and this run "
                f"has {n}: each process reads its own share of the data, so the iterator positions do not carry over"
            )
        return self.data_states[jax.process_index()]


def _gather_json(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([mine.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: mine.size] = mine
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes)]


def _state_items(state: Any) -> dict[str, Any]:
    """Split a train state (a flax struct dataclass) into the array items."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {
        "params": fields.pop("params"),
        "opt_state": fields.pop("opt_state"),
        "train": fields,
    }


def _join_state(abstract_state: Any, items: dict[str, Any]) -> Any:
    return abstract_state.replace(params=items["params"], opt_state=items["opt_state"], **items["train"])


def describe(tree: Any) -> dict[str, Any]:
    """A JSON description of a (possibly abstract) sharded tree: shape, dtype and mesh partitioning
    of every leaf, keyed by its path; allocates nothing."""
    leaves = {}
    mesh = None
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = None
        sh = getattr(x, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            mesh = {"axis_names": list(sh.mesh.axis_names), "shape": [int(n) for n in sh.mesh.devices.shape]}
            spec = [list(a) if isinstance(a, tuple) else a for a in sh.spec]
        leaves[jax.tree_util.keystr(path)] = {"shape": list(x.shape), "dtype": str(x.dtype), "spec": spec}
    return {"mesh": mesh, "leaves": leaves}


def abstract_from_description(desc: dict[str, Any], mesh: jax.sharding.Mesh | None) -> dict[str, jax.ShapeDtypeStruct]:
    """`{path: ShapeDtypeStruct}` from `describe` output, partitioned the same way on `mesh` (which
    may have a different shape or device count, but the same axis names). Allocates nothing."""
    out = {}
    for key, leaf in desc["leaves"].items():
        sharding = None
        if mesh is not None:
            spec = leaf["spec"] or []
            names = {a for s in spec if s is not None for a in (s if isinstance(s, list) else [s])}
            missing = names - set(mesh.axis_names)
            if missing:
                raise CheckpointError(f"{key} is partitioned over mesh axes {sorted(missing)} that the new mesh lacks")
            # A dimension keeps a mesh axis only while the new mesh's sizes still divide it.
            axes = [[] if s is None else list(s) if isinstance(s, list) else [s] for s in spec]
            axes += [[]] * (len(leaf["shape"]) - len(axes))
            sharding = jax.sharding.NamedSharding(mesh, fit_spec(axes, leaf["shape"], mesh))
        out[key] = jax.ShapeDtypeStruct(tuple(leaf["shape"]), jnp.dtype(leaf["dtype"]), sharding=sharding)
    return out


def structure_differences(saved: dict | None, items: Any) -> list[str]:
    """How the tree a run would restore (`items`, abstract) differs from a checkpoint's `structure`
    item: leaves on one side only, other shapes or dtypes. Partitioning may differ (a restore
    reshards); an older checkpoint without a structure item has nothing to compare."""
    if not isinstance(saved, dict) or not isinstance(saved.get("leaves"), dict):
        return []
    want, have = describe(items)["leaves"], saved["leaves"]
    diffs = [f"{k} only in the checkpoint" for k in sorted(set(have) - set(want))]
    diffs += [f"{k} only in this run" for k in sorted(set(want) - set(have))]
    for k in sorted(set(want) & set(have)):
        w, h = want[k], have[k]
        if list(w["shape"]) != list(h.get("shape", [])) or w["dtype"] != h.get("dtype"):
            diffs.append(f"{k} {h.get('dtype')}{list(h.get('shape', []))} (now {w['dtype']}{list(w['shape'])})")
    return diffs


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


@dataclasses.dataclass
class _Info:  # what Orbax's preservation policies look at
    step: int
    metrics: dict | None
    time: datetime.datetime


class Checkpointer:
    """The checkpoints of one training run (`RUN_DIR/checkpoints`), on every process.

    `save` is asynchronous and never raises for I/O problems: it reports them on stderr and returns
    False, so a full disk or a read-only directory does not kill a run that can still train.
    """

    def __init__(self, run_dir: str | os.PathLike, options: CheckpointOptions = CheckpointOptions(), *, read_only: bool = False):
        self.run_dir = storage.path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS_DIR
        _check_orbax_can_write(self.directory)
        self.options = options
        self.read_only = read_only
        self.failed_steps: list[int] = []
        self._pending: int | None = None  # step of the async save in flight
        # Unfinished saves are removed once this run is known to continue the run on disk (a
        # compatible restore, or its first save), never by a start that is then refused.
        self._cleaned = read_only
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # Orbax's deletion runs even when the new save fails, so retention is done here.
                preservation_policy=ocm.LatestN(n=None),
                # Setting best_fn makes Orbax write the metrics item.
                best_fn=_best_value,
                best_mode="min",
                enable_async_checkpointing=options.async_save,
                # Create step directories before `save` returns, so a read-only or missing
                # directory fails at once instead of timing out in a background thread.
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
                create=False,
                read_only=read_only,
                **_orbax_path_options(self.directory),
            ),
            item_handlers={
                **{k: ocp.PyTreeCheckpointHandler(use_compression=options.compress)
                   for k in ARRAY_ITEMS},
                **{k: ocp.JsonCheckpointHandler() for k in JSON_ITEMS},
            },
        )

    # -- housekeeping ------------------------------------------------------------------------

    def _remove_unfinished(self) -> None:
        """Delete temporary folders of saves that never completed (a crash or SIGKILL mid-save)."""
        if self._cleaned:
            return
        self._cleaned = True
        if jax.process_index() != 0:
            return
        for p in _unfinished(self.directory):
            try:
                if storage.is_url(p):
                    storage.rmtree(p)
                else:
                    shutil.rmtree(p)
                warn(f"removed unfinished checkpoint folder {p} (the save was interrupted)")
            except OSError as e:
                warn(f"warning: cannot remove unfinished checkpoint folder {p}: {e}")

    def steps(self) -> list[int]:
        """Complete checkpoint steps on disk, ascending."""
        return complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.options.every > 0 and step % self.options.every == 0

    def metrics(self, step: int) -> dict | None:
        try:
            return read_json_item(self.directory / str(step), "metrics")
        except CheckpointError:
            return None

    # -- saving ------------------------------------------------------------------------------

    def _check_writable(self, nbytes: int) -> str | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            if storage.is_url(probe):  # an object store: writable is all there is to check
                storage.write_bytes(probe, b"")
                storage.remove(probe)
                return None
            probe.write_bytes(b"")
            probe.unlink()
            free = shutil.disk_usage(self.directory).free
        except OSError as e:
            return f"{self.directory} is not writable ({e.strerror or e})"
        if free < nbytes * 1.05:
            return f"not enough disk space in {self.directory} ({free / 2**20:.0f} MiB free, needs {nbytes / 2**20:.0f} MiB)"
        return None

    def warn(self, message: str, detail: str | None = None) -> None:
        """One line on stderr; `detail` (a traceback, a long storage error) goes to the run's
        warnings log, which the line names."""
        if detail and jax.process_index() == 0:
            log = self.run_dir / WARNINGS_LOG
            try:
                files.append_text(log, f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} {message}\n{detail}\n\n")
                message += f" (details: {log})"
            except OSError:
                pass  # a read-only or full run directory: the line alone
        warn(message)

    def _report_failure(self, step: int, why: str, detail: str | None = None) -> None:
        self.failed_steps.append(step)
        kept = self.steps()
        where = f"earlier checkpoints are intact: steps {kept}" if kept else "no earlier checkpoint exists"
        self.warn(f"error: checkpoint for step {step} was NOT saved: {why}; {where}", detail)

    def wait(self) -> bool:
        """Block until the save in flight is on disk; report it if it failed. Returns success."""
        step, self._pending = self._pending, None
        if step is None:
            return True
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # the async write raised: disk full, I/O error, ...
            self._report_failure(step, cause(e), _details(e))
            if jax.process_index() == 0:  # free the space the partial write took
                self._remove_partial(step)
            return False
        if step not in self.steps():
            self._report_failure(step, "the save did not complete")
            return False
        self._prune()
        return True

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict | None = None,
        config: dict | None = None,
        metrics: dict | None = None,
    ) -> bool:
        """Start an asynchronous save of `state` at `step`; True if it started. Every process
        calls it, each with its own `data_state`; all of them are saved.

        Waits for the previous save first. Refuses (and reports) a state with NaN/Inf parameters,
        so the newest checkpoint is always the last good one.
        """
        if self.read_only:
            raise CheckpointError("this Checkpointer is read-only")
        self._remove_unfinished()
        self.wait()
        if step in self.steps():
            return False
        data_states = _gather_json(data_state or {})
        finite = _all_finite(state.params)  # replicated; on multi-host runs read the local copy
        if not bool(np.asarray(finite.addressable_data(0))):
            self._report_failure(step, "the parameters contain NaN or Inf")
            return False
        items = _state_items(state)
        nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(items))
        problem = self._check_writable(nbytes)
        if problem:
            self._report_failure(step, problem)
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(
            **{k: ocp.args.PyTreeSave(items[k]) for k in ARRAY_ITEMS},
            data=ocp.args.JsonSave({"processes": data_states}),
            config=ocp.args.JsonSave(config or {}),
            structure=ocp.args.JsonSave(describe(items)),
        )
        try:
            self._mgr.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # directory creation or the synchronous copy failed
            self._report_failure(step, cause(e), _details(e))
            self._remove_partial(step)
            return False
        self._pending = step
        if not self.options.async_save:
            return self.wait()
        return True

    def _remove_partial(self, step: int) -> None:
        """Delete what a failed save of `step` wrote (on an object store, the step folder itself)."""
        storage.rmtree(self.directory / f"{step}{TMP_SUFFIX}")
        if storage.is_url(self.directory) and step not in self.steps():
            storage.rmtree(self.directory / str(step))

    def _prune(self) -> None:
        """Delete complete checkpoints that are neither among the latest K nor the best M.

        Runs on every process (Orbax's delete has a barrier); metrics are read as plain files,
        without Orbax's barriers, so every process takes the same decision."""
        infos = [_Info(s, _metrics_file(self.directory / str(s)), datetime.datetime.now()) for s in self.steps()]
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=max(self.options.keep, 1)),
            ocm.BestN(get_metric_fn=_best_value, reverse=True, n=self.options.keep_best,
                      keep_checkpoints_without_metrics=False),
        ])
        keep = policy.should_preserve(infos, context=ocm.PreservationContext())
        for info, k in zip(infos, keep):
            if not k:
                try:
                    self._mgr.delete(info.step)
                except Exception as e:  # deletion is housekeeping: never fatal
                    self.warn(f"warning: cannot delete old checkpoint step {info.step}: {cause(e)}", _details(e))

    # -- restoring ---------------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore step `step` onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        items = _state_items(abstract_state)
        step_dir = self.directory / str(step)
        try:
            r = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    **{k: ocp.args.PyTreeRestore(items[k], restore_args=ocp.checkpoint_utils.construct_restore_args(items[k]))
                       for k in ARRAY_ITEMS},
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
            state = _join_state(abstract_state, {k: r[k] for k in ARRAY_ITEMS})
            jax.block_until_ready(state)
        except Exception as e:  # Orbax/tensorstore raise many types for damaged files
            raise CheckpointError(f"{step_dir}: cannot be restored ({type(e).__name__}: {short_error(e)})") from e
        data_states = r["data"].get("processes") if isinstance(r["data"], dict) else r["data"]
        if data_states is not None and not (isinstance(data_states, list) and all(isinstance(d, dict) for d in data_states)):
            raise CheckpointError(f"{step_dir / 'data'}: not a list of data iterator states")
        return Restored(step, state, data_states if data_states and any(data_states) else None,
                        r["config"] or None, self.metrics(step))

    def restore_latest(self, abstract_state: Any, check: Callable[[dict], list[str]] | None = None) -> Restored | None:
        """Restore the newest readable checkpoint. None if there is none.

        Before any array is read, the checkpoint's structure (and, with `check`, its saved run
        config: `check(config)` lists what differs) is compared with this run's: a difference raises
        IncompatibleCheckpoint and touches nothing. Only a checkpoint that cannot be read (missing
        or truncated files, unreadable metadata) is damaged: reported in one line, set aside as
        `<step>.damaged` so that the run can save that step again, and the previous one is tried.
        """
        for step in reversed(self.steps()):
            step_dir = self.directory / str(step)
            try:
                structure, config = read_json_item(step_dir, "structure"), read_json_item(step_dir, "config")
            except CheckpointError as e:
                self._set_aside(step, e)
                continue
            differences = (check(config if isinstance(config, dict) else {}) if check else [])
            tree = structure_differences(structure, _state_items(abstract_state))
            if tree:
                differences.append(f"{len(tree)} arrays of the state differ (e.g. {tree[0]})")
            if differences:
                raise IncompatibleCheckpoint(
                    f"checkpoint step {step} in {self.directory} was saved by another kind of run: {'; '.join(differences)}. "
                    "Resume with its settings, or choose another run_dir= (nothing was changed on disk)"
                )
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointError as e:
                self._set_aside(step, e)
                continue
            self._remove_unfinished()
            return restored
        return None

    def _set_aside(self, step: int, e: CheckpointError) -> None:
        """Report a damaged checkpoint in one line and rename it `<step>.damaged` (process 0)."""
        moved = ""
        if not self.read_only and jax.process_index() == 0:
            dst = self.directory / f"{step}{DAMAGED_SUFFIX}"
            storage.rmtree(dst)
            storage.move(self.directory / str(step), dst)
            self._mgr.reload()
            moved = f", set aside as {dst.name}"
        self.warn(f"warning: newest checkpoint is damaged: {self.directory / str(step)} ({cause(e.__cause__ or e)}){moved}; trying the previous one", _details(e))

    def close(self) -> bool:
        ok = self.wait()
        self._mgr.close()
        return ok

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _metrics_file(step_dir: Path) -> dict | None:
    try:
        metrics = json.loads((step_dir / "metrics" / _json_filename("metrics")).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _best_value(metrics: dict | None) -> float:
    value = (metrics or {}).get(BEST_METRIC)
    return float("inf") if value is None or not np.isfinite(value) else float(value)


def restore_or_init(
    ckpt: Checkpointer, abstract_state: Any, init_fn: Callable[[], Any]
) -> tuple[Any, Restored | None]:
    """`(state, restored)`: the newest readable checkpoint restored onto `abstract_state`'s
    shardings, or `(init_fn(), None)` when the run has no checkpoint yet.

    `init_fn` should create the state directly sharded (a jitted init with `out_shardings`).
    """
    restored = ckpt.restore_latest(abstract_state)
    if restored is None:
        return init_fn(), None
    return restored.state, restored


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for every leaf of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (checked with `stop`).

    On a multi-host run the decision comes from Orbax's preemption sync point (JAX's coordination
    service), so that every host stops and saves at the same step. A second SIGINT aborts at once.
    """

    def __init__(self, ckpt: Checkpointer | None = None):
        self._ckpt = ckpt
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        warn(f"{self.signal_name} received: finishing the current step, then saving a checkpoint "
              "(send SIGINT again to abort without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def stop(self, step: int) -> bool:
        if jax.process_count() > 1 and self._ckpt is not None:
            return self._ckpt._mgr.reached_preemption(step)
        return self.signal_name is not None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# --------------------------------------------------------------------------------------------
# The history of a run's configs: one record per start
# --------------------------------------------------------------------------------------------

HISTORY_FILE = "config_history.jsonl"


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
    path = storage.path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


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

LIBRARY_LOG = "library.log"


@contextlib.contextmanager
def library_logs_to(run_dir: str | os.PathLike):
    """Send what Orbax and TFDS log through absl, asyncio's task errors and Python's "Exception
    ignored" reports to RUN_DIR/library.log instead of the console while the block runs: the console
    keeps the project's one-line reports, which name the file. On an object store the log is kept in
    a local file while the block runs, then appended to RUN_DIR/library.log."""
    remote = storage.is_url(run_dir)
    path = (Path(tempfile.mkstemp(prefix="gpt2_jax-library-", suffix=".log")[1]) if remote
            else Path(run_dir).absolute() / LIBRARY_LOG)
    try:
        stream = open(path, "a", encoding="utf-8")
    except OSError:  # a read-only run directory: leave the logs where they were
        yield
        return
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    absl_handler = absl_logging.get_absl_handler().python_handler
    saved_stream, saved_hook = absl_handler.stream, sys.unraisablehook

    def unraisable(info):  # "Exception ignored in <coroutine ...>" from a failed async write
        stream.write(f"{info.err_msg or 'Exception ignored in'}: {info.object!r}\n")
        stream.write("".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)))

    # Orbax logs through absl, which writes either through its own handler or, without absl.app,
    # through the root logger's; asyncio logs through the root logger too.
    root.handlers = [file_handler]
    absl_handler.stream = stream
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        gc.collect()  # a failed async write's coroutines report themselves when collected: here, not at exit
        root.handlers = saved_handlers
        absl_handler.stream = saved_stream
        sys.unraisablehook = saved_hook
        stream.close()
        if remote:
            _upload_log(path, storage.path(run_dir) / LIBRARY_LOG)


def _upload_log(local: Path, url) -> None:
    try:
        text = local.read_text(encoding="utf-8", errors="replace")
        if text:
            files.append_text(url, text)
    except OSError as e:
        warn(f"warning: cannot write {url}: {cause(e)}")
    finally:
        local.unlink(missing_ok=True)


def library_logs_at_exit_to(run_dir: str | os.PathLike) -> None:
    """For a process about to exit after training: what is reported while it shuts down (asyncio's
    "exception was never retrieved" for a failed async write, "Exception ignored" from collected
    coroutines) goes to RUN_DIR/library.log as well, not to the console (for a run directory on an
    object store, to a local file named gpt2_jax-library-*.log in the temporary directory: nothing
    can be uploaded once the interpreter is shutting down)."""
    if storage.is_url(run_dir):
        path = Path(tempfile.gettempdir()) / f"gpt2_jax-library-{os.getpid()}.log"
    else:
        path = Path(run_dir).absolute() / LIBRARY_LOG
    if not path.parent.is_dir():
        return
    handler = logging.FileHandler(path, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().handlers = [handler]

    def unraisable(info):
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{info.err_msg or 'Exception ignored in'}: {info.object!r}\n")
                f.write("".join(traceback.format_exception(info.exc_type, info.exc_value, info.exc_traceback)))
        except OSError:
            pass

    sys.unraisablehook = unraisable


# --------------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"


class RunDirInUse(CheckpointError):
    """Another live process is training in this run directory."""


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
                warn(f"warning: cannot renew {self.path}: {cause(e)}")

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

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# What `python -m gpt2_jax.checkpoint ls RUN_DIR` prints
# --------------------------------------------------------------------------------------------


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _saved_at(step_dir) -> str:
    """When a step was saved (UTC): its folder's time on a disk, its commit time from Orbax's
    metadata on an object store (whose folders have no time)."""
    if storage.is_url(step_dir):
        try:
            meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
            seconds = (meta.get("commit_timestamp_nsecs") or meta["init_timestamp_nsecs"]) / 1e9
        except (OSError, ValueError, KeyError, TypeError):
            return "?"
    else:
        seconds = step_dir.stat().st_mtime
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def list_run(run_dir) -> str:
    """A table of a run's checkpoints: step, time, size, metrics; then the config of the newest."""
    run_dir = storage.path(run_dir)
    ckpt_dir = checkpoints_dir_of(run_dir)
    if ckpt_dir is None:
        if not run_dir.exists():
            raise CheckpointError(f"{run_dir} does not exist")
        raise CheckpointError(f"{run_dir} is not a run directory (no {CHECKPOINTS_DIR}/ inside)")
    steps = complete_steps(ckpt_dir)
    metrics = {}
    for s in steps:
        try:
            metrics[s] = read_json_item(ckpt_dir / str(s), "metrics") or {}
        except CheckpointError:
            metrics[s] = None
    best = [s for s in steps if metrics[s] and BEST_METRIC in metrics[s]]
    best_step = min(best, key=lambda s: metrics[s][BEST_METRIC]) if best else None
    keys = sorted({k for m in metrics.values() if m for k in m})
    lines = [f"{ckpt_dir}: {len(steps)} checkpoint(s)"]
    header = f"{'step':>8}  {'saved (UTC)':19}  {'size':>10}  " + "  ".join(f"{k:>12}" for k in keys)
    lines.append(header.rstrip())
    for s in steps:
        d = ckpt_dir / str(s)
        t = _saved_at(d)
        m = metrics[s]
        vals = "  ".join(f"{m[k]:>12.5g}" if m and k in m else f"{'-':>12}" for k in keys) if m is not None else "metrics unreadable"
        tags = [t for t, cond in (("latest", s == steps[-1]), ("best", s == best_step)) if cond]
        lines.append(f"{s:>8}  {t:19}  {_human(storage.tree_bytes(d)):>10}  {vals}{'  (' + ', '.join(tags) + ')' if tags else ''}")
    others = sorted(p.name for p in ckpt_dir.iterdir() if not p.name.isdigit() and not p.name.startswith("."))
    for name in others:
        why = ("unfinished save, deleted when training resumes" if TMP_SUFFIX in name
               else "damaged, set aside" if name.endswith(DAMAGED_SUFFIX) else "not a checkpoint")
        lines.append(f"{'':>8}  {name} ({why})")
    history = read_history(ckpt_dir.parent)
    if history:
        lines.append(f"starts ({HISTORY_FILE}):")
        for h in history:
            changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in h.get("changed", {}).items()) or (
                "first start" if h is history[0] else "no change")
            lines.append(f"  {h.get('time', '?')}  step {h.get('start_step', '?'):>6}  pid {h.get('pid', '?')} on {h.get('host', '?')}: {changed}")
    if steps:
        try:
            cfg = read_json_item(ckpt_dir / str(steps[-1]), "config")
        except CheckpointError as e:
            cfg = f"unreadable ({e})"
        lines.append(f"config of step {steps[-1]}:")
        lines.append(json.dumps(cfg, indent=2, sort_keys=True) if isinstance(cfg, dict) else str(cfg))
    return "\n".join(lines)
