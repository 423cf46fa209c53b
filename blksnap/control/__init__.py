"""The control layer: the ``blksnapd`` daemon (``daemon``: operations and
life; ``users``: who uses a device or image; ``server``: the control socket;
``host``: systemd and leftovers of a dead daemon), its control protocol and
the :class:`~blksnap.control.client.Client` that speaks it, and the host side
of the block layer (loop devices, freezing file systems)."""
