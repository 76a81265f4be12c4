"""Optional third-party attention backends (imported lazily; ``sparse_attn`` runs without them)."""
