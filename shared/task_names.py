"""The import paths of the functions RQ runs in a worker: the gateway enqueues by these names and
never imports worker code (it would pull in MLX)."""

GENERATE = "worker.tasks.generate"
"""One generation: a `GenerateRequest` as a dict, returning a `GenerationResult` as a dict."""

SYNTHESIZE = "worker.tasks.synthesize"
"""A batch's synthesis: the batch id and a request whose placeholders its children's texts fill."""

EMBED = "worker.tasks.embed"
"""Vectors for texts (an `EmbedRequest` as a dict), or a rerank's scores."""
