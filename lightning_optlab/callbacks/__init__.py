"""Lightning callbacks: thin glue over the optim, policy, manifolds and spectral layers."""
from .retraction import ManifoldRetraction  # noqa: F401

from .gradient_analysis import ComponentGradientAnalysis  # noqa: E402
from .lr_scaling import ModularLRScaling  # noqa: E402
from .ns_analysis import NewtonSchulzAnalysis  # noqa: E402
from .spectral import SpectralMonitor  # noqa: E402
from .step_time import StepTimeMonitor  # noqa: E402
from .progress import LineProgressBar  # noqa: E402
from .tensorboard_layout import TensorBoardLayout  # noqa: E402
