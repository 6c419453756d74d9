"""`python -m services.models`: the Embedder and Captioner contracts in one process
(MODELS_* for the process, EMBEDDER_* / CAPTIONER_* for each contract's model options)."""

from __future__ import annotations

from services.common.server import run
from services.models.app import build_app
from services.models.settings import ModelsSettings


def main() -> None:
    settings = ModelsSettings()
    run(settings, lambda: build_app(settings))


if __name__ == "__main__":
    main()
