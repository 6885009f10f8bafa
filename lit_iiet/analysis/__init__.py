"""Reading and measuring trained models: TensorBoard scalars, iteration influence, fixed-point convergence."""
