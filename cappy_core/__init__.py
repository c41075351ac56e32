"""Cappy, the method as a plain library: data, labelling, scorer, generation, selection, training.

No Ray in here (``tests/core/test_no_ray.py`` imports every module with ``ray`` blocked), and no
heavy imports at package import time: import the submodule you need.
"""

__version__ = "0.1.0"
