"""gpt2_jax: GPT-2 in JAX/Flax.

Modules, from the top of the layer map (../shared/ARCHITECTURE.md; tests/test_architecture.py
checks that imports only go down it) to its leaves:
- entry points: the `cli` of train, eval, generate, data, convert, checkpoint, plot, config, harness;
- workflows: train (the loop, its hooks, preemption, the plan), eval (the evaluation report),
  generate.tasks (the paper's generation tasks), finetune (prompt/completion data), harness (the
  model for lm-evaluation-harness), plot (training curves);
- engines: eval.scoring (log-likelihoods), generate (prefill and KV-cached decoding), eval.tasks
  (the paper's zero-shot benchmarks and HellaSwag: file -> items -> scores);
- model access: weights (loading a model from any source), convert (Hugging Face weights);
- state: checkpoint (Orbax training and params-only checkpoints), run_dir (what a run directory
  holds: lock, config history, logs, final record), metrics (a run's metrics files);
- steps: step (train, eval, prefill and decode steps), optim (AdamW);
- model: model (the transformer), attention (its kernel per platform);
- placement: sharding (mesh, placement), memory (the preflight), costs (FLOPs per token, MFU);
- leaves: config (model config, presets, what each field means to a resume), train.config,
  tokenizer (GPT-2's BPE), data (token stores, loaders), storage (paths and URLs), files (atomic
  writes), jsonl (JSON-lines files), errors (one-line errors), published (the papers' figures).
The compiled-program analysis (hlo: HLO reading; hlo.theory: what the collectives should move)
serves the dry run, the benchmarks and the tests.
"""

__version__ = "0.1.0"
