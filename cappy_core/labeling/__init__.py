"""Labelling, the method's third step: each sampled candidate's Rouge-L against the references
(:mod:`~cappy_core.labeling.rouge`, also the (instruction, response, label) pair schema), the
candidates' Parquet layout (:mod:`~cappy_core.labeling.candidates`), and the labelled pairs a
scorer trains on (:mod:`~cappy_core.labeling.pair_mixture`, :mod:`~cappy_core.labeling.pair_files`).
Import the submodule you need; ``PAIR_SCHEMA`` resolves lazily."""


def __getattr__(name: str):
    if name == "PAIR_SCHEMA":  # the labelled pairs' schema (README's data section names it here)
        from cappy_core.labeling.rouge import PAIR_SCHEMA

        return PAIR_SCHEMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
