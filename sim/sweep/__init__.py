"""Grid / what-if sweeps over scenario fields, run on Dask."""
