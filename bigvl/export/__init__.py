"""Checkpoints both ways between bigvl and PyTorch, in the released M²-Encoder layout.

  name_map   the bigvl-path ⇄ PyTorch-key map and its per-parameter hooks (NumPy only)
  params_io  bigvl parameter directories (orbax) and training workdirs (JAX)
  torch_m2   a PyTorch M²-Encoder and the reading of released checkpoint files (PyTorch, no JAX)

Nothing is imported here, so that `bigvl.export.torch_m2` loads without JAX and
`bigvl.export.params_io` without PyTorch.
"""
