"""An index directory: its layout, the SQLite catalogue, the FAISS file and the searchable vectors,
and the builds (local and on Ray) that fill it."""
