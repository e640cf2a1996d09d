"""The lab's one PID-1 program: ``core`` (what every lab host's init does) and the layers of the
host kinds (``esxi``, also serving esx-classic, and ``libvirt``; the cluster node's layer is
``vmflab.cluster.pid1``). Standard library only: see ``core``."""
