"""The warm, killable process pool: ``pool.ProcessPool`` (the locked public face and the loop
that alone owns workers, messages, kills, respawn and resize), ``worker`` (the program each
worker runs), ``watch`` (the watcher that takes every task down with its owner) and
``proctree`` (process-group and tree liveness). Internal: use ``valent.plugin``."""
