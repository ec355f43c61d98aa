"""``python -m micro_daemon``: the daemon alone, as the CLI starts it in the background.

Lighter than ``micro server`` (no CLI to import); settings come from the
``MICRO_*`` variables only.
"""

from __future__ import annotations

import logging
import sys

from micro.errors import MicroError
from micro.home import Home
from micro_daemon.grpc_transport import use_polling_transport
from micro_daemon.settings import Settings


def main() -> int:
    use_polling_transport()
    from micro_daemon.app import run  # imports grpc, which reads the transport choice once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(Settings.load(), Home.from_env())
    except MicroError as exc:
        print(f"Error: {exc.detail}", file=sys.stderr)
        return 9
    return 0


if __name__ == "__main__":
    sys.exit(main())
