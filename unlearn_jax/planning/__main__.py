"""`python -m unlearn_jax.planning ...`: the planner; bad input exits 2 with the error."""

import sys

from unlearn_jax.planning.command import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
