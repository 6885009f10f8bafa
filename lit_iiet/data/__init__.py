from lit_iiet.data.lm import LMDataModule
from lit_iiet.data.seq2seq import Seq2SeqDataModule, SummarizationDataModule, TranslationDataModule
from lit_iiet.data.shards import ShardedLMDataModule
from lit_iiet.data.tokenizer import Tokenizer

__all__ = [
    "LMDataModule",
    "Seq2SeqDataModule",
    "ShardedLMDataModule",
    "SummarizationDataModule",
    "Tokenizer",
    "TranslationDataModule",
]
