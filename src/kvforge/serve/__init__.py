"""The HTTP service (FastAPI): the matcher's API, routing, metrics."""

from kvforge.serve.app import create_app

__all__ = ["create_app"]
