"""Grid / what-if sweeps over scenario fields, run on Dask.

``spec`` reads a sweep spec, ``expand`` turns it into resolved, validated runs, ``execute`` runs them on a
Dask cluster and records each in ``results.parquet`` (``results``), ``report`` writes ``report.html``.
"""
