"""`python -m services.embedder`: serve the Embedder with settings from EMBEDDER_* variables."""

from __future__ import annotations

from services.common.server import run
from services.embedder.app import create_app
from services.embedder.settings import EmbedderSettings


def main() -> None:
    settings = EmbedderSettings()
    run(settings, lambda: create_app(settings))


if __name__ == "__main__":
    main()
