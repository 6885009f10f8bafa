"""Reading and measuring trained models: TensorBoard scalars (and, later, iteration influence)."""
