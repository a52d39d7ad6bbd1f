"""bigvl: a JAX/Flax, TPU-first training codebase for bilingual vision-language models."""

__version__ = "0.1.0"
