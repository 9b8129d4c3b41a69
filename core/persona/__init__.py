"""persona."""
