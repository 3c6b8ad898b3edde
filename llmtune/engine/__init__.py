"""The shared trainer core. The only package that imports deepspeed."""
