"""What a compiled program costs: its memory, and its FLOPs with every loop iteration.

XLA's cost analysis counts a loop body once. `loop_flops` counts the other iterations
of a traced program's `lax.scan`s from its jaxpr, `record_loop_flops` keeps that count
beside the compiled program, and `flops_of` adds the two.
"""

from __future__ import annotations

import math
import weakref


def memory_of(compiled) -> dict[str, int]:
    """Bytes per device from `compiled.memory_analysis()`, plus the peak estimate."""
    stats = compiled.memory_analysis()
    memory = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "generated_code": int(stats.generated_code_size_in_bytes),
    }
    # A donated input that an output reuses is live once, not twice.
    memory["peak_estimate"] = (
        sum(memory[k] for k in ("argument", "output", "temp", "generated_code")) - memory["alias"]
    )
    return memory


# Compiled programs -> the FLOPs of loop iterations XLA's cost analysis leaves out.
_UNCOUNTED_LOOP_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_loop_flops(compiled, jaxpr) -> None:
    """Remembers, for `flops_of(compiled)`, the FLOPs of the loop iterations XLA's cost
    analysis leaves out of `compiled`, traced as `jaxpr` (`loop_flops`)."""
    _UNCOUNTED_LOOP_FLOPS[compiled] = loop_flops(jaxpr)


def uncounted_loop_flops(compiled) -> float:
    """What `record_loop_flops` recorded for `compiled`; 0 if nothing."""
    return _UNCOUNTED_LOOP_FLOPS.get(compiled, 0.0)


def xla_flops(compiled) -> float:
    """FLOPs per device of a compiled program as XLA's cost analysis counts them: a loop
    body once."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per executable
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def flops_of(compiled) -> float:
    """FLOPs per device of a compiled program: `xla_flops` plus, for programs whose
    loops were recorded (`record_loop_flops`; the planner's `programs.compile_planned` does),
    the other iterations of their `lax.scan`s."""
    return xla_flops(compiled) + uncounted_loop_flops(compiled)


# Elementwise primitives XLA's cost analysis counts as one FLOP per output element
# (exp, log, rsqrt and the like are transcendentals, not FLOPs; moves and casts are free).
_ELEMENTWISE_FLOPS = frozenset(
    "add add_any sub mul div max min neg abs sign square integer_pow select_n "
    "eq ne lt le gt ge".split()
)
_REDUCTIONS = frozenset(("reduce_sum", "reduce_max", "reduce_min"))


def _own_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        depth = math.prod(lhs[d] for d in contracting)
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * depth
    if name in _ELEMENTWISE_FLOPS:
        return float(math.prod(eqn.outvars[0].aval.shape))
    if name in _REDUCTIONS:
        return float(math.prod(eqn.invars[0].aval.shape))
    return 0.0


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _jaxpr_flops(jaxpr, *, every_iteration: bool) -> float:
    """Dot and elementwise FLOPs of `jaxpr`, a scan's body counted `length` times
    (`every_iteration`) or once (as XLA's cost analysis does)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        inner = sum(_jaxpr_flops(j, every_iteration=every_iteration) for j in _sub_jaxprs(eqn))
        if eqn.primitive.name == "scan" and every_iteration:
            inner *= eqn.params["length"]
        total += inner + _own_flops(eqn)
    return total


def loop_flops(jaxpr) -> float:
    """The FLOPs XLA's cost analysis leaves out of a traced program: every iteration of
    its `lax.scan` loops after the first (XLA counts a while body once). Counted from the
    jaxpr: dot products (2 per multiply-add) and elementwise arithmetic, as XLA counts
    them, so a loop's share comes within ~1% of XLA's count of the same body unrolled.
    Shapes inside `shard_map` are per device, like XLA's count; a loop outside one would
    be counted for the whole program. The loops of the planner's programs ('blockwise'
    attention) run per device under `shard_map` wherever the batch divides over the mesh."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return _jaxpr_flops(jaxpr, every_iteration=True) - _jaxpr_flops(jaxpr, every_iteration=False)


# jax.random in an instruction's op_name metadata: XLA:CPU runs threefry's rounds as a
# loop of integer hashing, negligible next to the UNet however often it is counted.
_RNG_OP_NAMES = ("threefry", "jit(_uniform)", "jit(_randint)", "jit(_normal)")


def loops_other_than_rng(compiled) -> int:
    """While loops of the optimized program other than random-number generation."""
    loops = [line for line in (compiled.as_text() or "").splitlines() if " while(" in line]
    return sum(not any(m in line for m in _RNG_OP_NAMES) for line in loops)
