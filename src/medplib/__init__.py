"""medplib: pixel-level biomedical multimodal LLMs (VQA, region prompts, [SEG] mask grounding)."""

from medplib.errors import MedplibError

__version__ = "0.1.0"
__all__ = ["MedplibError", "__version__"]
