"""``hubwatch-report``: outage reports (built on the outage engine; see issue 5)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print("hubwatch-report: outage reports are not built yet (they need the outage engine)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
