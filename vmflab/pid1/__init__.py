"""The lab's one PID-1 program: ``core`` (what every lab host's init does), ``system`` (what it
asks of the kernel) and the layers of the host kinds: ``esxi`` (also serving esx-classic),
``libvirt``, and the cluster node's, ``vmflab.cluster.pid1``. Standard library only: see ``core``.
"""
