"""Backends behind one small async contract (see ``backends.base``)."""
