"""``micro server``: the daemon in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["server"]


def server(
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="gRPC proxy address HOST:PORT [env MICRO_SERVER_ADDRESS; 127.0.0.1:8081]"
        ),
    ] = None,
    api_address: Annotated[
        str | None,
        typer.Option(
            "--api-address", help="HTTP API address HOST:PORT [env MICRO_API_ADDRESS; 127.0.0.1:8080]"
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Backend profile [env MICRO_PROFILE; local]")
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option(
            "--tls-cert",
            help="PEM certificate (chain): serve TLS on the gRPC and HTTP ports; needs --tls-key "
            "[env MICRO_TLS_CERT]",
        ),
    ] = None,
    tls_key: Annotated[
        str | None,
        typer.Option("--tls-key", help="PEM private key of --tls-cert, unencrypted [env MICRO_TLS_KEY]"),
    ] = None,
    auth: Annotated[
        str | None,
        typer.Option(
            "--auth",
            help="jwt: accounts, tokens and rules enforced; none: everyone is an admin [env MICRO_AUTH; jwt]",
        ),
    ] = None,
    disable_default_admin: Annotated[
        bool,
        typer.Option(
            "--disable-default-admin",
            help="Never create the admin/micro account (shared platforms) [env MICRO_AUTH_DISABLE_ADMIN]",
        ),
    ] = False,
) -> None:
    """Run the micro server (every building block) in the foreground until Ctrl-C."""
    import logging

    from micro_daemon.grpc_transport import use_polling_transport

    use_polling_transport()  # before grpc is imported: it reads the choice once
    from micro.home import Home
    from micro_daemon.app import run
    from micro_daemon.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load(
        address=address,
        api_address=api_address,
        profile=profile,
        tls_cert=tls_cert,
        tls_key=tls_key,
        auth=auth,
        auth_disable_admin="1" if disable_default_admin else None,
    )
    run(settings, Home.from_env())
