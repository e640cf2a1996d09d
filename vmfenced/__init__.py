"""vmfenced: fencing daemon for virtual-machine cluster nodes."""

__version__ = "0.1.0"
