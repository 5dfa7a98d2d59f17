"""The web app: FastAPI routes rendering Jinja2 pages and JSON over backend.core (never workers/)."""
