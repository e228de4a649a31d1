"""Data sets and batching for jaxgen."""

from jaxgen.data.digits import load_digits_split
from jaxgen.data.loader import BatchLoader

__all__ = ["BatchLoader", "load_digits_split"]
