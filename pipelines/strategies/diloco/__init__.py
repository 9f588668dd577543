"""`diloco`: local SGD with an outer optimizer (DiLoCo, Douillard et al. 2023)."""
