"""The scorer, the method's fourth step: the model (:mod:`~cappy_core.scorer.model`, whose
checkpoint format is :mod:`~cappy_core.scorer.checkpoint` and whose pick is
:mod:`~cappy_core.scorer.pick`), its training recipe (:mod:`~cappy_core.scorer.schedule`, torch-free),
the training loop and its batches and state (:mod:`~cappy_core.scorer.training`,
:mod:`~cappy_core.scorer.batches`, :mod:`~cappy_core.scorer.train_state`), training runs
(:mod:`~cappy_core.scorer.runs`) and the agreement metrics (:mod:`~cappy_core.scorer.metrics`).
``Scorer`` resolves lazily, so importing the recipe never loads torch."""


def __getattr__(name: str):
    if name == "Scorer":
        from cappy_core.scorer.model import Scorer

        return Scorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
