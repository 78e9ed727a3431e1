"""Lightning callbacks: thin glue over the optim, policy, manifolds and spectral layers."""
from .retraction import ManifoldRetraction  # noqa: F401
