"""The hardening algorithm: settings, objectives, layer hooks, the epoch loop and its checkpoints."""
