"""Exit heads for a checkpoint: adapter training and calibration reports."""
