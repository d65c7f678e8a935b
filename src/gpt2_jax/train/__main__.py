import sys

from gpt2_jax.train import supervisor

if supervisor.wanted(sys.argv[1:]):  # several processes: the trainer runs as this process's child
    raise SystemExit(supervisor.run([sys.executable, *sys.orig_argv[1:]], supervisor.process_id(sys.argv[1:])))

from gpt2_jax.train.cli import main  # noqa: E402

raise SystemExit(main(exiting=True))
