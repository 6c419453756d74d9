"""`python -m services.captioner`: serve the Captioner API configured by CAPTIONER_* variables."""

from __future__ import annotations

from services.captioner.app import build_app
from services.captioner.settings import CaptionerSettings
from services.common.server import run


def main() -> None:
    settings = CaptionerSettings()
    run(settings, lambda: build_app(settings))


if __name__ == "__main__":
    main()
