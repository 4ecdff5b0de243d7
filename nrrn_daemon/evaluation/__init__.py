"""Image-quality measures of the paper and the classical baselines NRRN is compared with."""
