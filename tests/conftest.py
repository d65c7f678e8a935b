"""Test setup: 8 fake CPU devices, strict rank promotion, the shared data directory."""

import os
from pathlib import Path

import jax
import pytest

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
