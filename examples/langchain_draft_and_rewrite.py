"""Two personas in one chain: the scientist drafts an explanation, the poet rewrites it.

Both ChatPersonas share one engine (one base model in memory, two LoRA adapters); switching
persona between the two steps costs well under a millisecond.

Run with `.venv/bin/python examples/langchain_draft_and_rewrite.py [QUESTION]`.
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnablePassthrough

from hyperlex import ChatPersona


def build_chain(max_tokens: int = 70) -> Runnable[dict[str, str], dict[str, str]]:
    """{"question"} -> {"question", "draft", "poem"}."""
    draft = (ChatPromptTemplate.from_messages([("human", "Explain briefly: {question}")])
             | ChatPersona(persona="scientist", max_tokens=max_tokens, temperature=0)
             | StrOutputParser())
    rewrite = (ChatPromptTemplate.from_messages(
                   [("human", "Rewrite this explanation as a short poem:\n\n{draft}")])
               | ChatPersona(persona="poet", max_tokens=max_tokens, seed=7)
               | StrOutputParser())
    return RunnablePassthrough.assign(draft=draft) | RunnablePassthrough.assign(poem=rewrite)


def main() -> None:
    question = " ".join(sys.argv[1:]) or "Why do leaves change colour in autumn?"
    result = build_chain().invoke({"question": question})
    print(f"scientist's draft:\n{result['draft']}\n\npoet's rewrite:\n{result['poem']}")


if __name__ == "__main__":
    main()
