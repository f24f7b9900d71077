"""torch: the frozen backbone and its families, prefix injection, the P-Tuning
methods, the adapter, the prompted pass, the layer mix, backbone identity and
the saved adapter format. Imports nothing above it."""
