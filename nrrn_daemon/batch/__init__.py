"""Whole data sets at once: reprocess on Dask, offline denoise of a stack."""
