"""How this process was launched: alone, or as one of several by a cluster launcher. A leaf that
imports nothing heavy, so that the command line's supervising parent (`gpt2_jax.train.supervisor`)
can ask it before JAX is imported."""

from __future__ import annotations

import os


def launched_as_several() -> bool:
    """Whether a cluster launcher started this process as one of several (SLURM, Open MPI, a
    multi-host TPU slice)."""
    env = os.environ
    return (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
