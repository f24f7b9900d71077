"""What the bench/ scripts share (no script imports another script)."""
