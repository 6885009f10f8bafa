from lit_iiet.models.lm import LanguageModel
from lit_iiet.models.seq2seq import Seq2SeqModel

__all__ = ["LanguageModel", "Seq2SeqModel"]
