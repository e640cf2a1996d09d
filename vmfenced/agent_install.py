"""Old name of `python3 -m vmfenced.clients.agent_install`, kept so scripts and runbooks work."""

from vmfenced.clients.agent_install import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
