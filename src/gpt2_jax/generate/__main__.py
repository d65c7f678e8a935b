from gpt2_jax.generate.cli import main

raise SystemExit(main())
