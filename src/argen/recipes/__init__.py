"""Recipes: training of weights no package ships (draft heads), seeded and cached beside the model."""
