"""Persona bundles: ``persona.yaml`` with its prompt contract (``bundle``), the one prompt
builder (``prompt``), and the plugin-package scaffold (``scaffold``)."""
