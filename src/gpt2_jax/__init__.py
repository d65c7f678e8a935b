"""gpt2_jax: GPT-2 in JAX/Flax.

Modules: config (model config, size presets), tokenizer (GPT-2's BPE), model (the transformer),
attention (its kernel per platform), sharding (mesh, placement), optim (AdamW), step (train and
eval steps), data (token stores, loaders), weights (loading a model from any source), checkpoint
(Orbax training checkpoints), convert (Hugging Face weights), train (the training loop), metrics (a
run's metrics files), finetune (prompt/completion data), eval (the paper's zero-shot benchmarks and
HellaSwag), harness (the model for lm-evaluation-harness), generate (sampling), prompts (the paper's
generation tasks), costs (FLOPs, MFU), files (atomic writes), jsonl (JSON-lines input), plot
(training curves).
"""

__version__ = "0.1.0"
