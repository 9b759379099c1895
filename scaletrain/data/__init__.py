"""Data: tokenizers, the bundled corpus, token files/windows and the core's sharded loader.

Typical use (tokenizer spec "byte" or a train_bpe .json path):

>>> tok = load_tokenizer("byte")
>>> tokens = load_tokens(bundled_corpus_path(), tok, seq_len=256)
>>> ds = TokenWindowDataset(tokens, seq_len=256)
>>> loader = ShardedLoader(ds, global_batch_size=32, micro_batch_size=8, dp_rank=0, dp_size=1, seed=0)
>>> micro_batches = loader.next_step()
"""

from scaletrain.data.corpus import bundled_corpus_path
from scaletrain.data.loader import ShardedLoader, epoch_permutation, stack_dict_batch
from scaletrain.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from scaletrain.data.tokens import TokenWindowDataset, load_tokens, tokenizer_fingerprint

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "ShardedLoader",
    "TokenWindowDataset",
    "Tokenizer",
    "bundled_corpus_path",
    "epoch_permutation",
    "load_tokenizer",
    "load_tokens",
    "stack_dict_batch",
    "tokenizer_fingerprint",
    "train_bpe",
]
