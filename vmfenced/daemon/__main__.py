"""`python3 -m vmfenced.daemon`: the same as the `vmfenced` command."""

from vmfenced.daemon.app import main

main()
