"""CTLanguage engine: grounded CT vision-language models, prompts -> masks and probabilities.

Pure Python (numpy, SimpleITK, torch, monai, transformers); never imports Slicer or Qt.
"""

__version__ = "0.1.0"
