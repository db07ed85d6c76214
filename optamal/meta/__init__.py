"""Meta-training: losses, perturbations, the truncated-BPTT trainer."""
