"""Checkpoints with Orbax, and nothing else: full training checkpoints that never lose a run,
params-only ones, the description of a saved tree and its compatibility check, and the listing.

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

The newest readable checkpoint is found by one rule, `newest_readable`, for training (which sets a
damaged step aside) and for loading weights alike.

A params-only checkpoint is a directory holding `config.json` (the `ModelConfig`) and `params/`
(an Orbax PyTree checkpoint); `gpt2_jax.weights` writes and reads it through the params-item
functions of `checkpoint.items`, where a checkpoint's layout on disk is described. Loading a model
from any of these is `gpt2_jax.weights.load`. The other files of a run directory are
`gpt2_jax.run_dir`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from gpt2_jax import run_dir as run_dir_lib, sharding, storage
from gpt2_jax.checkpoint.agreement import SaveAbandoned, SaveAgreement
from gpt2_jax.checkpoint.items import (  # noqa: F401  (the checkpoint's public names, one import away)
    ARRAY_ITEMS, BEST_METRIC, COMMIT_FILE, DAMAGED_SUFFIX, ITEM_NAMES, JSON_ITEMS, PARAMS_DIR, TMP_SUFFIX,
    CheckpointError, IncompatibleCheckpoint, abstract_from_description, checkpoints_dir_of, complete_steps, describe,
    read_json_item, restore_params_dir, save_params_dir, structure_differences,
    _check_orbax_can_write, _json_filename, _orbax_path_options, _unfinished,
)
from gpt2_jax.errors import details, one_line, warn
from gpt2_jax.run_dir import CHECKPOINTS_DIR, CONFIG_FILE  # noqa: F401

# --------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    """What to keep, and how to write. (When to save is the training loop's: its save hook.)"""

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
        """This process's data iterator state (None if none was saved). A checkpoint of another
        number of processes carries over when every process saved the same state (a global data
        position); states that differ were each one process's own share of the data, and do not."""
        if not self.data_states:
            return None
        n = jax.process_count()
        if len(self.data_states) == n:
            return self.data_states[jax.process_index()]
        if any(d != self.data_states[0] for d in self.data_states):
            raise CheckpointError(
                f"checkpoint step {self.step} was saved by {len(self.data_states)} process(es) and this run "
                f"has {n}: their data iterator states differ (each process read its own share of the data), "
                "so the data position does not carry over"
            )
        return self.data_states[0]


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


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def newest_readable(checkpoints_dir, read: Callable[[int], Any], *, set_aside: Callable[[int], str] | None = None) -> Any:
    """`read(step)` of the newest complete step that can be read; None when none can.

    The one rule for training and for loading weights: a step whose files are missing, truncated or
    unreadable (`read` raises CheckpointError) is damaged: reported in one line (its detail in the
    run's warnings log), set aside by `set_aside(step)` when given, and the previous one is tried.
    A readable checkpoint of another kind of run (IncompatibleCheckpoint) is not damage: it
    propagates, and nothing is touched.
    """
    checkpoints_dir = storage.path(checkpoints_dir)
    for step in reversed(complete_steps(checkpoints_dir)):
        try:
            return read(step)
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            moved = set_aside(step) if set_aside else ""
            run_dir_lib.report(
                checkpoints_dir.parent,
                f"warning: newest checkpoint is damaged: {checkpoints_dir / str(step)} ({one_line(e.__cause__ or e)}){moved}; "
                "trying the previous one", details(e) if set_aside else None,
            )
    return None


@dataclasses.dataclass
class _Info:  # what Orbax's preservation policies look at
    step: int
    metrics: dict | None
    time: datetime.datetime


class Checkpointer:
    """The checkpoints of one training run (`RUN_DIR/checkpoints`), on every process.

    `save` is asynchronous and never raises for I/O problems: it reports them on stderr and returns
    False, so a full disk or a read-only directory does not kill a run that can still train. On a
    multi-process run every process learns the outcome of every save (`checkpoint.agreement`): a
    part that failed on one host fails the save everywhere, reported once by process 0 naming the
    host; only a save that cannot even start on one host (its synchronous part raised, while the
    others may be waiting in a collective of it) ends the run, with a CheckpointError naming the host.
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
        client = None if read_only else sharding.distributed_client()
        self._pod = SaveAgreement(client) if client is not None else None
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
                async_options=ocp.AsyncOptions(
                    create_directories_asynchronously=False, barrier_sync_fn=self._pod.barrier if self._pod else None
                ),
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
        """One line on stderr, its `detail` in the run's warnings log (`run_dir.report`)."""
        run_dir_lib.report(self.run_dir, message, detail)

    def _report_failure(self, step: int, why: str, detail: str | None = None) -> None:
        self.failed_steps.append(step)
        if self._pod is not None and jax.process_index() != 0:  # a pod's failed save: process 0 says it
            return
        kept = self.steps()
        where = f"earlier checkpoints are intact: steps {kept}" if kept else "no earlier checkpoint exists"
        self.warn(f"error: checkpoint for step {step} was NOT saved: {why}; {where}", detail)

    def wait(self) -> bool:
        """Block until the save in flight is on disk; report it if it failed. Returns success
        (on several processes: whether every process's part was written, the same everywhere)."""
        step, self._pending = self._pending, None
        if step is None:
            return True
        why = detail = None
        try:
            self._mgr.wait_until_finished()
        except SaveAbandoned:  # another process's part failed: `settle` names it
            pass
        except Exception as e:  # the async write raised: disk full, I/O error, ...
            why, detail = one_line(e), details(e)
        if self._pod is not None:
            why = self._pod.settle(why)  # the same on every process
        if why is not None:
            self._report_failure(step, why, detail)
            if jax.process_index() == 0:  # free the space the partial write took
                self._remove_partial(step)
            return False
        if step not in self.steps():
            self._report_failure(step, "the save did not complete")
            return False
        self._prune()
        return True

    def abort(self) -> None:
        """The run ends with an error: on one process, wait for the save in flight (it may still
        complete); on several, give this process's part up at once if it is still being written,
        so that no process waits for it (the others learn of the error from `gpt2_jax.train.pod`),
        and post its outcome if it is done (a written part does not fail the save)."""
        if self._pod is None or self._pending is None:
            self.wait()
            return
        self._pending = None
        if self._mgr.is_saving_in_progress():
            self._pod.post_part("the run ended with an error")
            try:
                self._mgr.wait_until_finished()
            except Exception:  # the save was abandoned; the run's error is what is reported
                pass
            return
        try:  # this process's part is done: its outcome is what the others learn
            self._mgr.wait_until_finished()
            self._pod.post_part(None)
        except Exception as e:
            self._pod.post_part(one_line(e))

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
        if self._pod is not None:  # every process starts this save, or none does
            self._pod.begin()
            problem = self._pod.agree(problem)
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
            if self._pod is not None:  # the others may wait for it in a collective: the run ends
                self._pod.post_part(one_line(e))
                raise CheckpointError(
                    f"process {jax.process_index()}: checkpoint for step {step} could not be started: {one_line(e)}"
                ) from e
            self._report_failure(step, one_line(e), details(e))
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
        without Orbax's barriers. On several processes the steps are process 0's choice, shared
        (`SaveAgreement.shared`): another process could list the folder while process 0 deletes."""
        infos = [_Info(s, _metrics_file(self.directory / str(s)), datetime.datetime.now()) for s in self.steps()]
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=max(self.options.keep, 1)),
            ocm.BestN(get_metric_fn=_best_value, reverse=True, n=self.options.keep_best,
                      keep_checkpoints_without_metrics=False),
        ])
        keep = policy.should_preserve(infos, context=ocm.PreservationContext())
        doomed = [info.step for info, k in zip(infos, keep) if not k]
        if self._pod is not None:
            doomed = json.loads(self._pod.shared("prune", json.dumps(doomed) if jax.process_index() == 0 else None))
        for step in doomed:
            try:
                self._mgr.delete(step)
            except Exception as e:  # deletion is housekeeping: never fatal
                self.warn(f"warning: cannot delete old checkpoint step {step}: {one_line(e)}", details(e))

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
            raise CheckpointError(f"{step_dir}: cannot be restored ({one_line(e)})") from e
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
        def read(step: int) -> Restored:
            step_dir = self.directory / str(step)
            structure, config = read_json_item(step_dir, "structure"), read_json_item(step_dir, "config")
            differences = (check(config if isinstance(config, dict) else {}) if check else [])
            tree = structure_differences(structure, _state_items(abstract_state))
            if tree:
                differences.append(f"{len(tree)} arrays of the state differ (e.g. {tree[0]})")
            if differences:
                raise IncompatibleCheckpoint(
                    f"checkpoint step {step} in {self.directory} was saved by another kind of run: {'; '.join(differences)}. "
                    "Resume with its settings, or choose another run_dir= (nothing was changed on disk)"
                )
            return self.restore(step, abstract_state)

        found = newest_readable(self.directory, read, set_aside=None if self.read_only else self._set_aside)
        if found is not None:
            self._remove_unfinished()
        return found

    def _set_aside(self, step: int) -> str:
        """Rename a damaged step `<step>.damaged` (process 0), so that the run can save it again."""
        if jax.process_index() != 0:
            return ""
        dst = self.directory / f"{step}{DAMAGED_SUFFIX}"
        storage.rmtree(dst)
        storage.move(self.directory / str(step), dst)
        self._mgr.reload()
        return f", set aside as {dst.name}"

    def close(self) -> bool:
        ok = self.wait()
        self._mgr.close()
        return ok

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
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


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for every leaf of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


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
    history = run_dir_lib.read_history(ckpt_dir.parent)
    if history:
        lines.append(f"starts ({run_dir_lib.HISTORY_FILE}):")
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
