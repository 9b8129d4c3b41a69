"""A persona in an LCEL chain: prompt | ChatPersona(persona="poet") | StrOutputParser().

Run with `.venv/bin/python examples/langchain_persona_chain.py [TOPIC]`. The first run loads
the embedded base model once (and converts it on the very first use).
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable

from hyperlex import ChatPersona


def build_chain(max_tokens: int = 60) -> Runnable[dict[str, str], str]:
    """The poet's contract is the system message; the prompt adds the user's request."""
    prompt = ChatPromptTemplate.from_messages([("human", "Write a short poem about {topic}.")])
    poet = ChatPersona(persona="poet", max_tokens=max_tokens, seed=7)
    return prompt | poet | StrOutputParser()


def main() -> None:
    topic = " ".join(sys.argv[1:]) or "autumn rain"
    for piece in build_chain().stream({"topic": topic}):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
