"""Intent routing: route preferences, router back-ends and their shared types."""
