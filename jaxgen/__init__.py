"""jaxgen: generative models in JAX and Flax NNX.

Importing `jaxgen` does not import JAX, so entry points can set XLA_FLAGS before JAX starts.
"""

__version__ = "0.1.0"
