"""launch/bench_torch.py (the PyTorch baseline of the GPU side by side) as a CPU smoke run."""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location("bench_torch",
                                                os.path.join(REPO, "launch", "bench_torch.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_sdpa_attention_is_the_models_own():
  bench = _module()
  torch.manual_seed(0)
  eager = bench.make_model("tiny", 1024, "eager", "cpu")
  sdpa = bench.make_model("tiny", 1024, "sdpa", "cpu")
  sdpa.load_state_dict(eager.state_dict())
  images, ids, mask = bench.synthetic_batch(eager.cfg, 4, 12, "cpu")
  mask[1, 3:] = 0
  with torch.no_grad():
    for a, b in ((eager.encode_image(images), sdpa.encode_image(images)),
                 (eager.encode_text(ids, mask), sdpa.encode_text(ids, mask))):
      torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bench_torch_runs_and_reports(tmp_path):
  r = _module().main(["--variant=tiny", "--vocab_size=1024", "--batch=8", "--text_len=16",
                      "--steps=2", "--warmup=1", f"--json={tmp_path / 'torch.json'}"])
  assert r["device"] == "cpu" and not r["compiled"] and r["samples_per_s"] > 0
  assert r["flops_per_sample_analytic"] > 0 and r["mfu"] is None   # no CPU peak in the table
  assert (tmp_path / "torch.json").exists()
