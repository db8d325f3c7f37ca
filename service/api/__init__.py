"""HTTP layer: FastAPI app factory, thin routes, transport parsing, error mapping."""

from service.api.app import create_app

__all__ = ["create_app"]
