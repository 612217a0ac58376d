"""Timers for mesh tests over real sockets: the LAN profile scaled by 1/5 to keep tests short."""

from __future__ import annotations

from symbiote.schema.mesh import SwimConfig

FAST_SWIM = SwimConfig(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.04,
    push_pull_interval=1.0,
    reconnect_interval=0.5,
    join_timeout=3.0,
)
