"""lm-evaluation-harness on any gpt2_jax model: the model `gpt2_jax` for `lm_eval`.

    python -m gpt2_jax.harness --model gpt2_jax --model_args model=PATH --tasks hellaswag,arc_easy

`model=` takes whatever `--model` takes elsewhere (`weights.load`: an HF GPT-2 directory, a
params-only checkpoint, a run or step directory, `random:SIZE`); `adapter` holds the model, on the
project's own Scorer and Generator, so its figures are those of the model `python -m gpt2_jax.eval`
scores, with the same GPT-2 BPE.

lm-evaluation-harness has no plugin mechanism for models defined outside it (its issues #1621 and
#3282), so `--model gpt2_jax` works in a process that imported `gpt2_jax.harness.adapter`:
`python -m gpt2_jax.harness` is lm-eval's own command line (every flag of `lm_eval`) with the model
registered, and from Python `import gpt2_jax.harness.adapter` comes before
`lm_eval.simple_evaluate(model="gpt2_jax", model_args="model=PATH", tasks=[...])`.
Needs `pip install 'gpt2_jax[harness]'`.
"""
