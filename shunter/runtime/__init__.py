"""Real instances: the engine loop with its command inbox, and instances in-process or as Ray actors."""
