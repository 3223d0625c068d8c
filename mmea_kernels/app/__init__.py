"""The command line and what it runs: ``cli`` (``mmea-kernels``), ``demo``, ``calculator`` (ASE),
``data`` / ``rmd17`` (datasets)."""
