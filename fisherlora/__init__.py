"""fisherlora: Fisher-guided LoRA initialisation (FILet, arXiv 2605.01046) with fused curvature kernels."""

__version__ = "0.1.0"
