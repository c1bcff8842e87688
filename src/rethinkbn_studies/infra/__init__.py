"""What runs the studies: the harness, the training runs' cache and process pool (``tasks``,
``cache``), and process helpers (``processes``, the library's)."""
