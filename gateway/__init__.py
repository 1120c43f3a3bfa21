"""The HTTP front of mlxq: admits work and enqueues it; never imports MLX."""
