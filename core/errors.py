"""Errors a user can cause and fix. The CLI prints them as one line, never as a traceback."""

from __future__ import annotations


class HyperlexError(Exception):
    """Base class for errors caused by input or environment, shown to users as one line."""


class ModelNotInstalled(HyperlexError):
    """The requested base model is not available on this machine."""


class PersonaNotAvailable(HyperlexError, ValueError):
    """A persona (or mood) that cannot answer: unknown, or installed but skipped (its adapter
    was trained on another base, or failed to load). A ``ValueError`` too, which is what
    LangChain code expects for a bad argument."""


class UnknownPersona(PersonaNotAvailable):
    def __init__(self, name: str, installed: list[str], kind: str = "persona"):
        self.name = name
        self.installed = installed
        listing = ", ".join(sorted(installed)) or "none"
        super().__init__(f"unknown {kind} {name!r}; installed {kind}s: {listing}")


class ContextTooLong(HyperlexError):
    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        super().__init__(f"the prompt takes {prompt_tokens} tokens and the model's context holds "
                         f"{context_length}: shorten the message")
