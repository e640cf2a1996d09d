"""Old home of the fence agent and of `python3 -m vmfenced.agent`, kept for installed wrappers.

`/usr/sbin/fence_vmfenced` files written before the clients moved to `vmfenced.clients` run
`from vmfenced.agent import main`; they keep working until they are written anew.
The agent lives in `vmfenced.clients.agent`.
"""

from vmfenced.clients.agent import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
