"""cnnbp: backpropagation through convolutional networks, visible and fast.

    from cnnbp import functional as F, nn, optim, reference

``functional`` runs the C++ kernels, ``nn`` builds networks whose every layer keeps its
inputs, outputs and gradients, ``reference`` is the plain float64 NumPy oracle, and
``walkthrough`` runs the derivation's 15-parameter network step by step. ``data`` loads
image datasets (digits, MNIST-format IDX files, .npz) and batches them, and
``gradcheck(model, x, y, loss_fn)`` compares a model's parameter gradients with finite
differences; ``explain(model, x, y, loss_fn)`` runs one input forward and backward and
returns a report whose ``to_html(path)`` writes the whole pass as one page; ``cnnbp train`` / ``cnnbp evaluate`` (module ``cnnbp.train``) train and report.
``with no_grad():`` runs forwards that keep nothing for a backward (inference).
``set_num_threads(n)`` / ``get_num_threads()`` control the kernels' threads; results do not
depend on them. ``kernel_isa()`` names the instruction set the kernels chose at run time.
"""

from . import data, functional, nn, optim, reference, walkthrough
from ._core import get_num_threads, kernel_isa, set_num_threads
from .explainer import explain
from .gradcheck import gradcheck
from .model_file import load
from .nn import is_grad_enabled, manual_seed, no_grad

__version__ = "0.1.0"

__all__ = [
    "functional",
    "nn",
    "optim",
    "reference",
    "walkthrough",
    "data",
    "gradcheck",
    "explain",
    "manual_seed",
    "no_grad",
    "is_grad_enabled",
    "load",
    "set_num_threads",
    "get_num_threads",
    "kernel_isa",
    "__version__",
]
