from gpt2_jax.config.cli import main

raise SystemExit(main())
