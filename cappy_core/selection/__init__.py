"""Selection, the method's last step: the selectors beyond the paper's scorer (MBR, the fused
selector: :mod:`~cappy_core.selection.selectors`) and their columns on scored candidate tables
(:mod:`~cappy_core.selection.scored_tables`); one sweep task whole (:mod:`~cappy_core.selection.task_eval`)
and its bookkeeping (:mod:`~cappy_core.selection.task_results`); evaluation against the baselines
(:mod:`~cappy_core.selection.evaluation`), classification with Cappy alone
(:mod:`~cappy_core.selection.classification`), paired bootstrap intervals
(:mod:`~cappy_core.selection.bootstrap`) and the report (:mod:`~cappy_core.selection.report`)."""
