"""Pure torch losses: tensors in, tensors out. No model, no deepspeed."""
