"""The backup application: one backup session (``session``) and the
repository it writes (``repo``)."""
