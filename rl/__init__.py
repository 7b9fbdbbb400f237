"""RL algorithm cores as plain PyTorch functions (they import only torch and model interfaces).

``rl.config`` holds the typed configs (no torch); ``rl.dapo`` the DAPO functions.
"""
