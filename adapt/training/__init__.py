"""Training plumbing shared by the loops: devices and seeds, data-parallel runs, resume, logs and debug grids."""
