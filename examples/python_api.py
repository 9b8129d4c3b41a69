"""hyperlex from Python: the same host, engine and controller that `agent chat` uses, all
from the front door (`import hyperlex`).

Run with `.venv/bin/python examples/python_api.py`.
"""

from hyperlex import Controller, GenerationParams, Host, build_prompt, open_engine

host = Host()  # discovers plugins and their personas (no torch yet)
engine = open_engine(host.personas.values())  # the base once, every adapter attached (torch)

# Low level: the persona's prompt in, its adapter active, text streamed out.
philosopher = host.persona("philosopher")
messages = build_prompt(philosopher, "Is a promise binding?", counter=engine)
for piece in engine.stream(messages, "philosopher", GenerationParams(temperature=0)):
    print(piece, end="", flush=True)
print()

# High level: a conversation with routing, history, the scene and turn records.
controller = Controller(host, engine, persona="philosopher", overrides={"max_new_tokens": 80})
turn = controller.send("What is courage?").complete()
print(f"[{turn.persona}, {turn.reason}, {turn.completion_tokens} tokens] {turn.reply}")
