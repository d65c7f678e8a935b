from gpt2_jax.eval.cli import main

raise SystemExit(main())
