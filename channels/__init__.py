"""The typed bus: messages, subject names, request/reply, the shared store, the embedded server.

This layer knows nothing of agents or councils; everything above talks to other
processes only through what is defined here.
"""
