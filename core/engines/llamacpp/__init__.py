"""The llama.cpp engine (``engine``) and the GGUF writers it needs: the base
(``gguf_base``) and the persona adapters (``gguf_lora``)."""
