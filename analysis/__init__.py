"""The LoRA paper's analysis (Hu et al. 2021, Section 7 and Appendix H): math, plots, tables."""
