"""Anthropic's Messages API: its shapes and its routes."""
