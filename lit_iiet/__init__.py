"""lit_iiet: ODE-inspired Transformers in PyTorch Lightning."""
