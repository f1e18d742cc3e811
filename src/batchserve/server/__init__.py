"""The HTTP server: app factory (:mod:`.app`), errors, limits, metrics and settings."""
