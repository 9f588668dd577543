"""`ps`: asynchronous parameter-server SGD (DistBelief's Downpour)."""
