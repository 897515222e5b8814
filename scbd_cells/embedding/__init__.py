"""Embedding stage: z_c and z_s of every cell (``embed``) and what they hold (``reconstruct``)."""
