"""The ``start_llm_server`` command: one server, or the same server scaled out on Ray Serve.

It sits above both choices, so neither imports the other: without ``--replicas`` /
``--ray-address`` it runs :func:`llm_server.api.server.serve` (what the spec's
``llm_server.api.server.main`` runs); with either, :func:`llm_server.scale_out.cli.run_scaled_out`
(Ray Serve, the ``ray`` extra), which builds each replica's app with the same ``create_app``.
Nothing else in the package imports :mod:`llm_server.scale_out`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from llm_server.api.plumbing.middleware import configure_logging
from llm_server.api.server import build_parser, command_line, serve, settings_for, started_key_store
from llm_server.scale_out.cli import run_scaled_out


def _parser() -> argparse.ArgumentParser:
    parser = build_parser()
    parser.add_argument("--replicas", type=int, help="serve N engine replicas behind one endpoint on Ray Serve "
                        "(needs the extra: pip install 'llm_server[ray]'; see docs/scale_out.md)")
    parser.add_argument("--ray-address", help="join this Ray cluster ('auto': the local node's) and serve on Ray Serve")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console script ``start_llm_server`` (``--help`` lists the flags)."""
    args = _parser().parse_args(command_line(argv))
    configure_logging(args.log_level.upper())
    settings = settings_for(args)
    configure_logging(args.log_level.upper(), settings.log_format)  # the configured format, from here on
    if args.replicas is not None or args.ray_address:
        run_scaled_out(settings, args.replicas, args.ray_address, check_keys=started_key_store)
        return
    serve(args, settings)


if __name__ == "__main__":
    main()
