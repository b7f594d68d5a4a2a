"""The peers: one small adapter module per library, looked up by name and imported lazily
(each library is installed only in the peers' environment)."""

from __future__ import annotations

import importlib

from bench.peers.base import Context, Peer, Unsupported

__all__ = ["PEERS", "Context", "Peer", "Unsupported", "load"]

#: name -> "module:Class"; the order is the table's column order.
PEERS: dict[str, str] = {
    "topiq": "bench.peers.topiq_peer:TopiqPeer",
    "routemq": "bench.peers.routemq_peer:RouteMQPeer",
    "arq": "bench.peers.arq_peer:ArqPeer",
    "saq": "bench.peers.saq_peer:SaqPeer",
    "streaq": "bench.peers.streaq_peer:StreaqPeer",
    "taskiq": "bench.peers.taskiq_peer:TaskiqPeer",
    "rq": "bench.peers.rq_peer:RqPeer",
}


def load(name: str) -> type[Peer]:
    """The adapter class of peer `name` (ImportError if its library is not installed)."""
    module_name, _, class_name = PEERS[name].partition(":")
    cls: type[Peer] = getattr(importlib.import_module(module_name), class_name)
    return cls
