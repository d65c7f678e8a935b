"""Preloaded by prepare's fork server: tokenizer workers fork with TFDS imported and the BPE built."""

from gpt2_jax import tokenizer
from gpt2_jax.data import store  # noqa: F401  (imports TFDS and array_record once)

tokenizer.get_tokenizer()
