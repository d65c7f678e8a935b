"""gpt2_jax: GPT-2 in JAX/Flax. Modules: config, model, tokenizer, convert, data, sharding, optim,
step, checkpoint, train, eval, generate, finetune, plot."""

__version__ = "0.1.0"
