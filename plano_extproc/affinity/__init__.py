"""Model affinity: pin a session's routing decision (``X-Model-Affinity``)."""
