from gpt2_jax.harness.cli import main

raise SystemExit(main())
