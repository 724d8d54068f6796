"""Training: tokenized datasets and samplers, schedules, and the Lightning module (imported lazily)."""
