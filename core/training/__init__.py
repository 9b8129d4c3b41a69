"""Training a persona adapter (``train``) and building its data: JSONL datasets (``data``),
distillation from a teacher (``distill``) and synthetic scene corpora (``synth``)."""
