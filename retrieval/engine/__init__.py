"""Training engine: optimisation, distributed helpers, logging, the training loop."""
