"""longctx: attention over long contexts, five approaches behind one interface."""
from .attention import attention, attention_reference, merge_attention
from .mechanisms import Mechanism, build_mechanism, register, registered
from .model import GPT, GPTConfig

__all__ = ["attention", "attention_reference", "merge_attention", "Mechanism", "build_mechanism", "register",
           "registered", "GPT", "GPTConfig"]
__version__ = "0.1.0"
