"""The scikit-learn handwritten digits as a TFDS data set stored in array_record files."""

from jaxgen.data.digits.digits_dataset_builder import Builder
from jaxgen.data.digits.reader import load_digits_split

__all__ = ["Builder", "load_digits_split"]
