"""Print the bare base model's answer and a persona's answer to the same prompts, side by side.

Both get the persona's system message, so the difference is the adapter alone.
Usage: .venv/bin/python examples/side_by_side.py [--persona NAME] "prompt" ["prompt" ...]
"""

import argparse
import textwrap

from hyperlex import GenerationParams, Host, build_prompt, open_engine

parser = argparse.ArgumentParser()
parser.add_argument("--persona", default="philosopher")
parser.add_argument("--max-new-tokens", type=int, default=120)
parser.add_argument("prompts", nargs="+")
args = parser.parse_args()

persona = Host().persona(args.persona)
engine = open_engine([persona])
params = GenerationParams(temperature=0, max_new_tokens=args.max_new_tokens,
                          repetition_penalty=1.1)
for prompt in args.prompts:
    messages = build_prompt(persona, prompt)
    print(f"## {prompt}\n")
    for label, name in (("base", None), (args.persona, args.persona)):
        text = engine.generate(messages, name, params).text.strip()
        print(f"**{label}:**\n{textwrap.fill(text, 100)}\n")
