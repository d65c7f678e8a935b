"""Test setup: 8 fake CPU devices, strict rank promotion, the shared data directory."""

import os
from pathlib import Path

import jax
import pytest

# gcsfs reads this when imported (Orbax's path library may import it during collection): no probe of
# GCS's gRPC API for hierarchical-namespace buckets, which the local emulator (`gcs` fixture) lacks.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Must run before JAX initializes its backends: gives 8 CPU devices for sharding tests.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT2_JAX_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only in CI): Tiny Shakespeare, LAMBADA, WikiText-2, PTB."""
    assert SHARED_DATA.is_dir(), f"shared data directory {SHARED_DATA} is missing"
    return SHARED_DATA


def _object_store(kind: str):
    from object_store_server import ObjectStore

    with ObjectStore(kind) as store:
        yield store


@pytest.fixture(scope="session")
def gcs():
    """A local GCS API (gcp-storage-emulator with GCS's preconditions); `gcs.bucket()` makes buckets.
    gcsfs and the emulator are in the test extra: a missing one fails the tests that use it."""
    yield from _object_store("gs")


@pytest.fixture(scope="session")
def s3():
    """A local S3 API (moto's server); `s3.bucket()` makes buckets (s3fs and moto: test extra)."""
    yield from _object_store("s3")
