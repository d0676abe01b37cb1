"""The CLI, the one Config, model resolution, and spawning/watching processes."""
