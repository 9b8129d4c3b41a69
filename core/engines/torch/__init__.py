"""The torch engine (transformers + PEFT): the engine (``engine``), one turn and the shared
``generate`` settings (``generation``), batching of waiting turns (``batching``), and fast
adapter attachment (``attach``)."""
