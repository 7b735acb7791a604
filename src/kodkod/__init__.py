"""kodkod: a TabbyAPI-compatible inference server for GGUF models on llama.cpp."""

__version__ = "0.1.0"
