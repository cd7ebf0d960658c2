"""Entry point of ``python -m pool``."""

from __future__ import annotations

import sys


def main() -> None:
    from pool.ops.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
