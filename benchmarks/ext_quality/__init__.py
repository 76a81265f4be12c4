"""Pieces of ``benchmarks/extension_quality.py`` (the length-extension quality benchmark, issue 15).

``scenes``: clips drawn by ``data/synthetic.py`` with their ground truth and the pixel-space latent;
``metrics``: object positions, PSNR/SSIM, attention FLOPs; ``report``: the markdown table and the plot.
"""
