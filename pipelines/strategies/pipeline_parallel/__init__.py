"""`pipeline`: pipeline model parallelism (GPipe, 1F1B) over stage actors."""
