"""`python -m services.gateway`: the HTTP/JSON API and the search page (uvicorn)."""
from __future__ import annotations

import signal

import uvicorn

from services.common.log import configure_logging, get_logger, service_name
from services.common.metrics import start_metrics_server
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_json, service=service_name(settings))
    log = get_logger("services.gateway")
    metrics_http = None
    if settings.metrics_port >= 0:
        metrics_http, metrics_port = start_metrics_server(settings.metrics_port, settings.host)
        log.info("metrics", port=metrics_port)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.http_port,
        log_config=None,  # uvicorn's records go through the shared structured logging
        access_log=False,  # http_requests_total counts every request instead
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        lifespan="on",
        server_header=False,
    )
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again for the handlers
    # that were installed before it: these, so the process ends with 0 after a clean
    # drain like the gRPC services (the default handler would kill it with -15).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: log.info("stop signal handled", signal=signum))
    try:
        uvicorn.Server(config).run()  # SIGTERM: stop accepting, finish requests in flight
    finally:
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        log.info("server stopped", app="gateway")


if __name__ == "__main__":
    main()
