"""The non-training commands that compose the lower layers (data label, data revise, ...)."""
