"""`lbfgs`: distributed L-BFGS (DistBelief's Sandblaster)."""
