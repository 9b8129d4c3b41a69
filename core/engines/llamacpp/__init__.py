"""engines/llamacpp."""
