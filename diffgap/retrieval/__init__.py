"""The query path: encode any modality, refine, search, filter; and micro-batching of concurrent queries."""
