"""HTTP machinery every route shares: strict JSON bodies, body and slow-client limits, the OpenAPI schema."""
