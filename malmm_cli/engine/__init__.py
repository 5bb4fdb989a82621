"""Frames -> answers: the model for a command, the session that reads a source once and keeps
it, the one-pass loop, the feature cache, tasks and presets, and the CPU thread policy."""
