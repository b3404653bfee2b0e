"""Hydra launcher `parallel`: a sweep's jobs side by side, several per GPU, on every GPU.

See `launcher.py`; Hydra finds the config in `config.py` by scanning `hydra_plugins`.
"""
