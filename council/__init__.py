"""Declaring councils, running sessions, recording and replay, the CLI."""
