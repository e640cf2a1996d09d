"""The clients' wing: the fence agent, vmfencectl and what they use.

Pacemaker starts the agent as a new process for every fence, status and monitor, so this
package imports the standard library only and nothing from the daemon (contracts in
pyproject.toml, checked in CI). It speaks the socket protocol as plain JSON.
"""
