"""`python3 -m vmflab demo`: the README demo."""

from __future__ import annotations

import sys

from vmflab.demo import main

if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["demo"]):
        print("usage: python3 -m vmflab [demo]", file=sys.stderr)
        sys.exit(2)
    main()
