"""What decides and what it costs, apart from the model wiring: policies, sparsity accounting, threshold calibration."""
