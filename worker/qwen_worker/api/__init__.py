"""HTTP blueprints of the worker, one per concern."""
