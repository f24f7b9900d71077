"""Serving: the adapter pool, mixed-adapter batches, the batcher (no HTTP), the
HTTP API module, the server settings and the FastAPI server. Imports
``pipeline`` and ``model``; FastAPI and pydantic only in ``server`` and ``api``."""
