"""k15: the Kimi k1.5 reinforcement-learning recipe in JAX.

Kept light: importing k15 does not import TensorFlow or torch; submodules import what they need.
"""
__version__ = "0.1.0"
