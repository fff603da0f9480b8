"""Learning from pairs: reading them, embedding them, training encoders, refiners and the mapper
baseline, and scoring retrieval."""
