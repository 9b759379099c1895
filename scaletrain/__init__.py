"""scaletrain: one parallelism core that trains every family of generative model."""

__version__ = "0.1.0"
