"""Serving: the OpenAI-compatible HTTP API (``server``, ``openai_api``) and the export to vLLM
(``vllm``)."""
