"""hyperlex from Python: the same host, engine and controller that `agent chat` uses.

Run with `.venv/bin/python examples/python_api.py`.
"""

from hyperlex.agent.controller import Controller
from hyperlex.engines.torch.engine import TorchEngine
from hyperlex.generation import GenerationParams
from hyperlex.host import Host

host = Host()  # discovers plugins and their personas (no torch yet)
engine = TorchEngine(list(host.personas.values()))  # the base once, every adapter attached

# Low level: complete messages in, a persona's adapter active, text streamed out.
philosopher = host.persona("philosopher")
messages = [
    {"role": "system", "content": philosopher.system_message()},
    {"role": "user", "content": "Is a promise binding?"},
]
for piece in engine.stream(messages, "philosopher", GenerationParams(temperature=0)):
    print(piece, end="", flush=True)
print()

# High level: a conversation with routing, history and turn records.
controller = Controller(host, engine, persona="philosopher", overrides={"max_new_tokens": 80})
turn = controller.send("What is courage?").complete()
print(f"[{turn.persona}, {turn.reason}, {turn.completion_tokens} tokens] {turn.reply}")
