"""The engine loop and its host: the engine's side of the contract (protocol.py), without HTTP."""
