"""regexp: experiments on regularization, optimization and generalization."""

__version__ = "0.1.0"
