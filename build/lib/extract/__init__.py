"""Extraction: a trained detector run over images, the attributes it finds written to SQLite or PostgreSQL,
annotated images, and queries over that database (`python -m extract`)."""
