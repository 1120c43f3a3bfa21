"""OpenAI's chat and text completions: the request and answer shapes, and their routes."""
