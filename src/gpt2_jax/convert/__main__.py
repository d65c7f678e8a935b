from gpt2_jax.convert.cli import main

raise SystemExit(main())
