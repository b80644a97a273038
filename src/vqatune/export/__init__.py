"""Merge the adapter, export GGUF for llama.cpp and an Ollama Modelfile."""
