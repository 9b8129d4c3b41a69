"""Engines: one base model with persona adapters, behind one interface (``base``), chosen by
name (``registry``): ``torch`` (transformers + PEFT), ``llamacpp``, ``openai``."""
