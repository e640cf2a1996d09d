"""Facts of the socket protocol (docs/protocol.md) that both wings need.

The clients speak the protocol with the standard library and the daemon validates it with
pydantic (`vmfenced.protocol`); the limits live here once so the two cannot drift apart.
This module imports nothing.
"""

from __future__ import annotations

DEFAULT_SOCKET = "/run/vmfenced/vmfenced.sock"
# One request line; the daemon answers a longer one with `too_large` and closes.
MAX_REQUEST_BYTES = 64 * 1024
MAX_VM_NAME = 256
MAX_HISTORY = 10_000
FENCE_ACTIONS = ("off", "on", "reboot")
