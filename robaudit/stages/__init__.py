"""The pipeline stages: analyze, harden and report, each writing or reading a run directory, and compare, which
reads two; the report's and the comparison's pages share one page kit (``html``) and one figure style (``plots``)."""
