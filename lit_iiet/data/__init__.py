from lit_iiet.data.lm import LMDataModule
from lit_iiet.data.tokenizer import Tokenizer

__all__ = ["LMDataModule", "Tokenizer"]
