"""Image files: slice TIFFs (databar, tags, atomic writes), stacks, voxel size, OME-Zarr."""
