"""The pipeline stages: analyze, harden and report, each writing or reading a run directory."""
