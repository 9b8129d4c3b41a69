"""The scene, the shared memory of a conversation: its model (``model``), the text-to-scene
encoders (``encoders``) and its display (``display``). Pure Python; no torch."""
