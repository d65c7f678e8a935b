from gpt2_jax.plot.cli import main

raise SystemExit(main())
