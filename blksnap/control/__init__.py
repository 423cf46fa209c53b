"""The control layer: the ``blksnapd`` daemon, its control protocol and the
:class:`~blksnap.control.client.Client` that speaks it, and the host side of
the block layer (loop devices, freezing file systems)."""
