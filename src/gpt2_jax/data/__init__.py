"""Data: TFDS sources (ArrayRecord, no TensorFlow) -> GPT-2 token stores -> Grain loaders.

    store = prepare("tiny_shakespeare")          # idempotent; returns the token store directory
    loader = TrainLoader(store, seq_len=256, batch_size=8, seed=0)
    batch = next(loader)                         # int32 [8, 257]
    for b in eval_batches(store, seq_len=256, batch_size=8): ...
"""

from gpt2_jax.data.loader import TrainLoader, eval_batches, eval_windows
from gpt2_jax.data.builders import DATA_DIR_ENV, DataError, decode_text
from gpt2_jax.data.sources import CACHE_DIR_ENV, catalog_download, resolve_dirs
from gpt2_jax.data.store import SplitTokens, load_manifest, prepare, report

__all__ = [
    "CACHE_DIR_ENV", "DATA_DIR_ENV", "DataError", "SplitTokens", "catalog_download", "TrainLoader", "decode_text", "eval_batches",
    "eval_windows", "load_manifest", "prepare", "report", "resolve_dirs",
]
