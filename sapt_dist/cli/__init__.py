"""Entry points: sapt-train and the block tools (predict, route, blocks)."""
