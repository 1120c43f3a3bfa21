"""Entry point of the gateway: `python -m gateway`."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.http.slow_clients import patient_h11
from shared.logs import configure_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 and
    # rewrite the peer address; MLXQ_TRUSTED_PROXIES is the only authority on that.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        proxy_headers=False,
        http=patient_h11(settings.body_read_limit_s),
        # uvicorn's loggers through ours: its own formatter would print exception messages.
        log_config=None,
    )


if __name__ == "__main__":
    main()
