"""M²-Encoder: bilingual two-tower contrastive pretraining (shared/docs/m2_encoder.md)."""
