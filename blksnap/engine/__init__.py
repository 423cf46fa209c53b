"""The engine: the kernel module's concepts, one module each, synchronous and
thread-safe, knowing nothing of FUSE, NBD, the daemon or backups.

``device`` (backing store, served device, gate), ``filters`` (the filter
stack), ``tracker`` (the ``blksnap`` filter), ``cbt`` (change-block tracking
map), ``cbt_checkpoint`` (the map in the state dir, across stops),
``cbt_intent`` (the write-intent file: the map across crashes), ``flakey``,
``delay``, ``powercut``, ``migrate`` (the filters that stand for the disk),
``diff_area`` (per-device chunk map, copy-on-write), ``diff_storage`` (where
original chunks go), ``snapshot`` and ``event_queue``, ``image`` (the point-
in-time view), ``gate``, ``params``, and ``engine`` (the
:class:`~blksnap.engine.engine.Engine` that holds them together).
"""
