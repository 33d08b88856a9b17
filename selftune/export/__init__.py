"""Exports that keep the identity: merged model, GGUF, Ollama Modelfile."""
