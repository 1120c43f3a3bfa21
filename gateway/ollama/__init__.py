"""Ollama's API: its shapes and its routes."""
