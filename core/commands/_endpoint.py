"""`--metrics-port` and `--metrics-host`, the flags of `queue:work` and `serve` that start the
process's `/metrics` and `/health` endpoint (`core.observe_http`, imported only when asked for:
a worker without the flag loads no web server)."""

from __future__ import annotations

import argparse

__all__ = ["add_endpoint_flags", "port_number"]


def port_number(text: str) -> int:
    """`--metrics-port`'s type: a TCP port, 1 to 65535 (0: any free one, named in the log)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535 (0: any free one), not {port}")
    return port


def add_endpoint_flags(parser: argparse.ArgumentParser) -> None:
    """`--metrics-port` and `--metrics-host`, shared by `queue:work` and `serve`."""
    parser.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="P",
        help="serve Prometheus /metrics and /health on this port (default: no endpoint)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of the metrics endpoint (default: 127.0.0.1; 0.0.0.0 for every "
        "interface: it shows queue names and counts, no job data)",
    )
