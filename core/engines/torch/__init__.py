"""engines/torch."""
