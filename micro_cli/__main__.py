"""``python -m micro_cli``: the same as the ``micro`` command."""

from micro_cli.main import main

main()
