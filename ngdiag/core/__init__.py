"""The bottom layer: errors, tensor helpers, I/O, configs, seeds and the one Euler integrator."""
