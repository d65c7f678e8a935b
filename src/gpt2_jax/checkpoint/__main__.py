from gpt2_jax.checkpoint.cli import main

raise SystemExit(main())
