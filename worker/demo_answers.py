"""Weights that make the `demo` model's answers end, and differ, as a chat model's do.

Random weights with a vocabulary of 32,000 make answers that never end: end-of-text
is one token in 32,000, and a random model with tied embeddings mostly repeats the
token it just made, so an agent client would wait for `max_tokens` of one word on
every turn. The demo's weights are shaped instead, all in mlx-lm's own qwen2 layout:

- each token's output row is a scaled copy of another token's embedding (a fixed
  random permutation), so the next token is usually that successor: the text walks
  the vocabulary rather than repeating;
- one token in `ENDS_EVERY` (words ending in a full stop first) carries a mark in
  one dimension of its embedding that only end-of-text's output row reads, so an
  answer ends after a few dozen tokens;
- the layers stay random, with their outputs scaled up, so that the context moves
  the walk: greedy answers depend on the prompt a little, sampled ones a lot.

The layers never write that dimension (their output projections' first rows are
zero), so the mark reaches the output as it was embedded.
"""

from __future__ import annotations

import random
from typing import Any

SUCCESSOR_SCALE = 0.25
"""The successor's logit is about 16 where the others spread with a deviation of 2: greedy follows the walk
and sampling at temperature 1 leaves it about one token in thirty."""

END_LOGIT = 19.0
"""End-of-text's logit after a marked token: 3 over the successor's, so the answer ends there."""

ENDS_EVERY = 40
LAYER_SCALE = 3.0


def shape(weights: dict[str, Any], vocab: list[str], eos: int, seed: int) -> dict[str, Any]:
    """`weights` (a random qwen2 model's, untied) with the embedding, output head and layer outputs
    shaped as the module says; `vocab` is each id's token as the tokenizer writes it."""
    import mlx.core as mx

    size, dims = weights["model.embed_tokens.weight"].shape
    draw = random.Random(seed)
    embedding = mx.random.normal((size, dims), key=mx.random.key(seed))
    marked = [0.0] * size
    for token in _ending(vocab, eos, draw):
        marked[token] = 1.0
    embedding = mx.concatenate([mx.array(marked)[:, None], embedding[:, 1:]], axis=1)

    successor = list(range(size))
    draw.shuffle(successor)
    head = mx.zeros((size, dims))
    head[mx.array(successor)] = SUCCESSOR_SCALE * embedding
    head[:, 0] = 0.0  # the mark is end-of-text's alone to read
    head[eos] = mx.zeros((dims,))
    head[eos, 0] = END_LOGIT

    shaped = dict(weights)
    shaped["model.embed_tokens.weight"] = embedding
    shaped["lm_head.weight"] = head
    for name, value in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            scaled = LAYER_SCALE * value
            scaled[0] = 0.0  # never written: the mark arrives as embedded
            shaped[name] = scaled
    return shaped


def _ending(vocab: list[str], eos: int, draw: random.Random) -> list[int]:
    """The tokens after which an answer ends: words with a full stop first, then others at random; never
    a newline (a generation prompt ends with one) or markup."""

    def plain(token: str) -> bool:
        return bool(token) and "Ċ" not in token and not token.startswith("<")

    stops = [i for i, token in enumerate(vocab) if i != eos and plain(token) and token.endswith(".")]
    rest = [i for i, token in enumerate(vocab) if i != eos and plain(token) and not token.endswith(".")]
    draw.shuffle(stops)
    draw.shuffle(rest)
    return (stops + rest)[: len(vocab) // ENDS_EVERY]
