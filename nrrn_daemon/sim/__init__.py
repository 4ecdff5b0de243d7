"""Stand-ins for the real world: a microscope that writes slices, an EM phantom, paper noise."""
