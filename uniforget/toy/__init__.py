"""The embedded testbed: a small Stable Diffusion pipeline trained to memorize planted images (TESTBED.md)."""
