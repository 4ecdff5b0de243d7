"""The network and how it runs: NRRN (pure PyTorch), tiling, the Denoiser, checkpoints, devices."""
