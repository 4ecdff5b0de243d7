"""Watching the microscope's output folder: observers, listing, settle and decode check."""
