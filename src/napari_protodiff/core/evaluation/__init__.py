"""Evaluation of encoders: patch-level probes, slide-level attention MIL, statistics, reports.

Modules (each one concept):

- :mod:`.errors`     one-sentence errors of this stage
- :mod:`.metrics`    classification metrics, C-index, bootstrap confidence intervals
- :mod:`.stats`      paired comparisons (bootstrap, permutation), Kaplan-Meier and log-rank
- :mod:`.patchsets`  labelled patch sets (class folders, CSV, labelled store) and their features
- :mod:`.probe`      linear probe and k-NN with group-aware splits
- :mod:`.cohort`     cohort CSVs and slide bags of patch features
- :mod:`.abmil`      the gated-attention MIL model and its losses
- :mod:`.mil`        patient-grouped cross-validation of ABMIL
- :mod:`.train_mil`  training one fold's model, predicting with it
- :mod:`.attention`  attention maps per patch saved for napari
- :mod:`.planted`    test cohorts with a planted signal built from real patches
- :mod:`.compare`    results tables: encoder x task x metric, significance vs a reference
- :mod:`.plots`      PNG plots (ROC, Kaplan-Meier, metric bars, data size)
- :mod:`.report`     Markdown report with PNG plots
- :mod:`.runs`       evaluations as jobs in run directories
- :mod:`.study`      ``protodiff study``: the data-efficiency experiment end to end

Nothing here imports napari or Qt; torch, scikit-learn and lifelines are imported lazily.
"""
