"""Model FLOPs, device peaks and MFU: what launch/bench_train.py reports a step against.

Model FLOPs count the matrix products a training step must do (forward + backward = 3 × forward),
not what an implementation chooses to redo (rematerialisation, GradCache's second forward, the ring
loss's recomputed blocks), nor elementwise work (LayerNorm, GELU, softmax) or the optimizer; this is
the convention of MFU (PaLM, appendix B). The compiled program's `cost_analysis()` counts everything
XLA emits, so the two differ by the elementwise share (a few percent) plus any recomputation.
"""

from __future__ import annotations

import re
from typing import Any



def layer_flops(tokens: int, width: int, mlp: int) -> int:
  """Forward FLOPs of one pre-LN layer over `tokens` tokens: q, k, v, out, fc1, fc2, q·kᵀ, p·v."""
  projections = 2 * tokens * (4 * width * width + 2 * width * mlp)
  attention = 2 * 2 * tokens * tokens * width   # q·kᵀ and p·v over all heads
  return projections + attention


# Dense (no sparsity) bfloat16 peak per chip, from the vendors' data sheets; matched in order
# against the lower-cased `device_kind`. CPUs have no fixed figure: measure one (--measure_peak).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),          # SXM
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # v5p reports "TPU v5"
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, flops in PEAK_FLOPS:
    if key in kind:
      return flops
  return None


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_trip_counts(hlo: str) -> list[int]:
  """Trip counts of the while loops of a compiled HLO module that run more than once.

  XLA's cost analysis counts a loop body once, whatever its trip count: a program with such loops
  (scanned layers, GradCache micro-batches) reports too few FLOPs.
  """
  return [n for n in map(int, _TRIP_COUNT.findall(hlo)) if n > 1]


def compiled_flops(compiled: Any) -> float:
  """FLOPs of one run of a compiled program, per device (the partitioned program's own count)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get("flops", 0.0))
