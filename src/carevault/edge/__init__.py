"""The HTTP edge: request limits, problem+json errors, client addresses."""
