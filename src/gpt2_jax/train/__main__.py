from gpt2_jax.train.cli import main

raise SystemExit(main(exiting=True))
