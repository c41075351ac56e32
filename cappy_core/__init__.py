"""Cappy, the method as a plain library, one subpackage per step in the order it runs:
:mod:`~cappy_core.data` (BIG-Bench tasks, shipped, cached or downloaded) → :mod:`~cappy_core.generation`
(candidates from an LLM; the embedded generator) → :mod:`~cappy_core.labeling` (Rouge-L labels and
labelled pairs) → :mod:`~cappy_core.scorer` (model, training, runs) → :mod:`~cappy_core.selection`
(selectors, evaluation, bootstrap, report). Beside them: :mod:`~cappy_core.config` (typed configs),
:mod:`~cappy_core.io` (atomic writes, output locks), :mod:`~cappy_core.remote` (outputs at URIs)
and :mod:`~cappy_core.fault_injection`.

No Ray in here (``tests/core/test_no_ray.py`` imports every module with ``ray`` blocked), and no
heavy imports at package import time: import the submodule you need.
"""

__version__ = "0.1.0"
