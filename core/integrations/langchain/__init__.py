"""hyperlex in LangChain: ``ChatPersona`` (a chat model answering as one persona) and
``HyperlexAgent`` (the routed multi-persona agent as a Runnable). See docs/langchain.md."""

from hyperlex.integrations.langchain.chat import (
    ChatPersona,
    HyperlexAgent,
    PersonaNotAvailable,
    shared_engine,
)

__all__ = ["ChatPersona", "HyperlexAgent", "PersonaNotAvailable", "shared_engine"]
