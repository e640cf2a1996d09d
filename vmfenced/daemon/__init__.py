"""The daemon's wing: the composition root (`app`) and everything only the daemon runs.

Imports flow down the layers written in pyproject.toml (`[tool.importlinter]`): the app on
top, the pure verdict and the SSH lanes at the bottom. Nothing in `vmfenced.clients` may
import this package. docs/architecture.md draws the whole house.
"""
