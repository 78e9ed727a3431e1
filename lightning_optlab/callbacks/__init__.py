"""Lightning callbacks: thin glue over the optim, policy, manifolds and spectral layers."""
