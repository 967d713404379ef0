"""`python -m unlearn_jax.plan ...`: the planner's first entry point, kept for existing scripts.

The planner lives in `unlearn_jax.planning`; this runs `python -m unlearn_jax.planning`.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("unlearn_jax.planning", run_name="__main__", alter_sys=True)
