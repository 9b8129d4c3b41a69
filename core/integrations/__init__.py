"""Adapters to other frameworks: hyperlex's personas inside their abstractions."""
