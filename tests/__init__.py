"""robaudit's test suite (a regular package, so that no installed package named ``tests`` shadows it)."""
