"""The routed agent in a chain, with memory across two invocations of one thread_id.

The first question is routed to whoever fits it best (the scientist, for this one); the
second asks for the poet in words and builds on the first answer, which the agent kept in the
session store under the thread's id, together with the shared scene.

Run with `.venv/bin/python examples/langchain_routed_memory.py`; then
`.venv/bin/agent sessions show lc-<thread id>` shows the stored conversation.
"""

from __future__ import annotations

import uuid

from langchain_core.prompts import ChatPromptTemplate

from hyperlex import HyperlexAgent


def main() -> None:
    agent = HyperlexAgent(options={"max_new_tokens": 60})
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | agent
    config = {"configurable": {"thread_id": f"example-{uuid.uuid4().hex[:8]}"}}

    first = chain.invoke({"question": "Why is the sky blue?"}, config)
    print(f"[{first.response_metadata['persona']}] ({first.response_metadata['reason']})")
    print(first.content, end="\n\n")

    second = None
    for chunk in chain.stream(
            {"question": "Let the poet answer: say that again as a short poem."}, config):
        if second is None:
            print(f"[{chunk.name}] ", end="")
        second = chunk if second is None else second + chunk
        print(chunk.content, end="", flush=True)
    assert second is not None
    print(f"\n\n({second.response_metadata['reason']}; saved as session "
          f"{second.response_metadata['session']})")


if __name__ == "__main__":
    main()
