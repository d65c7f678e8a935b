"""A checkpoint on disk: where its steps are, which are complete, its items, and the description
of a saved tree that lets a restore check shapes and reshard before it reads an array.

A step directory holds the items `ARRAY_ITEMS` (Orbax PyTrees) and `JSON_ITEMS`, plus the metrics
item Orbax writes itself; `gpt2_jax.checkpoint` writes and restores them. A params-only checkpoint
is `config.json` beside a `params/` PyTree directory (`save_params_dir`, `restore_params_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity as ocp_atomicity

from gpt2_jax import storage
from gpt2_jax.errors import one_line
from gpt2_jax.run_dir import CHECKPOINTS_DIR
from gpt2_jax.sharding import fit_spec

PARAMS_DIR = "params"
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
        raise CheckpointError(f"{params_dir}: cannot be restored ({one_line(e)})") from e
    finally:
        handler.close()


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
        raise CheckpointError(f"{item}: cannot be read ({one_line(e)})") from e


def _json_filename(name: str) -> str:
    # Orbax's JSON handler stores its object in a file named "metadata"; the metrics item that the
    # CheckpointManager writes names its file "metrics".
    return "metrics" if name == "metrics" else "metadata"


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


