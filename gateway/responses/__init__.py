"""OpenAI's Responses API: its shapes, its stored responses, and its routes."""
