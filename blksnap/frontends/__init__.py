"""How requests reach the engine: FUSE files (for loop devices) and NBD."""
