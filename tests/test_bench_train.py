"""launch/bench_train.py on m2_tiny (its own process, on one CPU device) and bigvl.train.flops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bigvl.models import m2_encoder
from bigvl.systems.m2_encoder import flops as m2_flops
from bigvl.train import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "bench_train.py")
KEYS = {"step_time_s", "samples_per_s", "flops_per_sample_analytic", "flops_per_sample_compiled",
        "mfu", "peak_bytes", "device"}


# slow: compiles m2_tiny; the FLOP counts are checked by hand by default (test_analytic_count_by_hand)
@pytest.mark.slow
def test_bench_train_on_m2_tiny(tmp_path):
  out = tmp_path / "bench.json"
  # One device (the suite's 8 fake ones would each run the replicated optimizer update, which is
  # real work but not model FLOPs), and GradCache micro-batches: a loop whose body XLA's cost
  # analysis counts once, so the script must count an unrolled step.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
      [sys.executable, SCRIPT, "--config", os.path.join(REPO, "configs/m2_tiny.py"),
       "--config.batch_size=32", "--config.loss.accum_steps=2", "--steps=2", "--warmup=1",
       f"--json={out}"], check=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=900)
  r = json.loads(out.read_text())
  assert KEYS <= set(r)
  assert r["device"] == "cpu" and r["num_devices"] == 1
  assert r["step_time_s"] > 0 and r["samples_per_s"] == pytest.approx(32 / r["step_time_s"])
  assert 2 in r["loops_in_step"] and r["flops_counted_with"] == {"loss.accum_steps": 1}
  assert r["flops_per_sample_compiled_raw"] < r["flops_per_sample_compiled"]
  # Elementwise work (LayerNorm, GELU, softmax) and the optimizer are the few percent between them.
  assert 1.0 <= r["flops_per_sample_compiled"] / r["flops_per_sample_analytic"] < 1.10
  assert 0 < r["mfu"] < 1 and r["peak_flops_per_chip_measured"] > 0
  assert r["peak_bytes"] > 0 and r["compiled_memory"]["temp_size_in_bytes"] > 0


def test_analytic_count_by_hand():
  cfg = m2_encoder.config_for("tiny", vocab_size=10, width=8, heads=2, depth=1, vl_depth=1,
                              mlp_dim=16, out_dim=4, patch_size=8, image_size=16)
  parts = m2_flops.forward_flops(cfg, text_len=3, contrastive_batch=5)
  # Vision: 4 patches + CLS = 5 tokens; per layer 2·5·(4·8·8 + 2·8·16) + 4·5·5·8; two layers.
  assert parts == {"patch_embed": 2 * 4 * (8 * 8 * 3) * 8,
                   "vision_layers": 2 * (2 * 5 * (256 + 256) + 4 * 25 * 8),
                   "text_layers": 2 * (2 * 3 * (256 + 256) + 4 * 9 * 8),
                   "heads": 2 * 2 * 8 * 4, "contrastive": 2 * 5 * 4}
  assert m2_flops.train_flops(cfg, 3, 5) == 3 * sum(parts.values())


def test_peak_table_and_loop_parser():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5") == 459e12 and flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12 and flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("cpu") is None
  hlo = ('%w = while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"9"}}\n'
         '%v = while(%u), condition=%c2, body=%b2, backend_config={"known_trip_count":{"n":"1"}}')
  assert flops.loop_trip_counts(hlo) == [9]
