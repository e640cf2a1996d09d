"""Old home of the fence agent, kept for wrappers written before 0.2.

`/usr/sbin/fence_vmfenced` files written by an earlier `agent_install` run
`from vmfenced.agent import main`; they keep working until they are written anew.
The agent lives in `vmfenced.clients.agent`.
"""

from vmfenced.clients.agent import main

__all__ = ["main"]
