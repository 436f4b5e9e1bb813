"""UniForget: learn which UNet units a Stable Diffusion model can lose on neutral prompts, then remove them.

The method (arXiv 2512.09687) and the model side of the tool live here; deployment lives in `exporter`.
"""

__version__ = "0.1.0"
