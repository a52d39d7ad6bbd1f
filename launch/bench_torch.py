"""The PyTorch baseline for launch/bench_train.py: the same M²-Encoder trained the way users would.

  # one H100, the issue's side by side (then the same batch through bigvl):
  python launch/bench_torch.py --variant=0.4B --batch=256 --json=/tmp/torch.json
  python launch/bench_train.py --config=configs/m2_0p4b.py --config.batch_size=256 \
      --config.model.dtype=bfloat16 --config.model.attention=cudnn --json=/tmp/bigvl.json

The model is `bigvl.export.torch_m2.M2Encoder` (the released layout and numerics) with its
attention computed by `F.scaled_dot_product_attention` (flash attention for the images, the
memory-efficient kernel for the padded texts), trained with bf16 autocast, fused AdamW and
`torch.compile` on CUDA; float32, eager and unfused on CPU (a smoke run). The step is the one
bigvl runs: both towers on a synthetic batch of the same shapes (right-padded texts), symmetric
InfoNCE over the batch, backward, AdamW, the temperature clamp. FLOPs per sample and MFU use
bigvl's analytic count (`bigvl.train.flops`), so the two benchmarks' figures compare directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bigvl.export import torch_m2  # noqa: E402


def sdpa_attention(self, x: torch.Tensor, key_mask: torch.Tensor | None, branch: str):
  """`torch_m2.MultiheadAttention.forward` with the softmax(q·kᵀ)·v done by SDPA."""
  b, l, d = x.shape
  heads = lambda t: t.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)
  q = heads(self.q_proj(x, branch) * self.head_dim ** -0.5)
  k = heads(self.k_proj(x, branch))
  v = heads(self.v_proj(x, branch))
  mask = None if key_mask is None else key_mask[:, None, None, :]
  out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
  out = out.transpose(1, 2).reshape(b, l, d)
  return self.out_proj(self.inner_attn_ln(out, branch), branch)


def make_model(variant: str, vocab_size: int | None, attention: str, device) -> torch_m2.M2Encoder:
  from bigvl.models import m2_encoder
  sizes = dict(m2_encoder.VARIANTS[variant])
  if vocab_size:
    sizes["vocab_size"] = vocab_size
  model = torch_m2.M2Encoder(torch_m2.M2Config(**sizes)).to(device).train()
  if attention == "sdpa":
    for module in model.modules():
      if isinstance(module, torch_m2.MultiheadAttention):
        module.forward = sdpa_attention.__get__(module)
  return model


def synthetic_batch(cfg, batch: int, text_len: int, device, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
  ids = torch.randint(1, min(300, cfg.vocab_size), (batch, text_len), generator=g)
  lengths = torch.randint(2, text_len + 1, (batch,), generator=g)
  mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
  return images.to(device), ids.to(device), mask.to(device)


def contrastive_loss(model, images, ids, mask):
  zimg = model.encode_image(images).float()
  ztxt = model.encode_text(ids, mask).float()
  logits = model.logit_scale.float().exp() * zimg @ ztxt.T
  labels = torch.arange(logits.shape[0], device=logits.device)
  return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def run(variant: str = "0.4B", batch: int = 256, text_len: int = 52, steps: int = 10,
        warmup: int = 3, attention: str = "sdpa", compile_: bool | None = None,
        vocab_size: int | None = None, logit_scale_max: float = math.log(100.0)) -> dict:
  from bigvl.models import m2_encoder
  from bigvl.systems.m2_encoder import flops as m2_flops
  from bigvl.train import flops
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  compile_ = cuda if compile_ is None else compile_
  model = make_model(variant, vocab_size, attention, device)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4,
                          betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05, fused=cuda)
  images, ids, mask = synthetic_batch(model.cfg, batch, text_len, device)

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
      loss = contrastive_loss(model, images, ids, mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      model.logit_scale.clamp_(max=logit_scale_max)
    return loss

  step_fn = torch.compile(step) if compile_ else step
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  t0 = time.perf_counter()
  for _ in range(warmup):
    loss = step_fn()
  sync()
  warmup_s = time.perf_counter() - t0
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step_fn()
    sync()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  cfg = m2_encoder.config_for(variant, **({"vocab_size": vocab_size} if vocab_size else {}))
  per_sample = m2_flops.train_flops(cfg, text_len, batch)
  name = torch.cuda.get_device_name() if cuda else "cpu"
  peak = flops.peak_flops(name)
  samples = batch / step_s
  return {"framework": f"torch {torch.__version__}", "variant": variant, "batch_size": batch,
          "text_len": text_len, "attention": attention, "compiled": compile_,
          "autocast": "bfloat16" if cuda else None, "device": name,
          "step_time_s": step_s, "step_times_s": times, "warmup_s": warmup_s,
          "samples_per_s": samples, "flops_per_sample_analytic": per_sample,
          "peak_flops_per_chip_table": peak,
          "mfu": per_sample * samples / peak if peak else None,
          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
          "loss": float(loss.detach())}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--variant", default="0.4B")
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--text_len", type=int, default=52)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
  ap.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                  help="torch.compile the step (auto: on CUDA)")
  ap.add_argument("--vocab_size", type=int, default=0, help="0: the variant's")
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  r = run(args.variant, args.batch, args.text_len, args.steps, args.warmup, args.attention,
          {"auto": None, "yes": True, "no": False}[args.compile], args.vocab_size or None)
  mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
  print(f"{r['framework']} {r['variant']} batch {r['batch_size']} on {r['device']} "
        f"(attention {r['attention']}, compiled {r['compiled']}, autocast {r['autocast']}): "
        f"{r['step_time_s']:.3f} s/step, {r['samples_per_s']:.1f} samples/s, MFU {mfu}, "
        f"peak memory {r['peak_bytes']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=2)
  return r


if __name__ == "__main__":
  main()
