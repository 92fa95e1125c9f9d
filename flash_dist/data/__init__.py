"""Data: GPT-2 tokenization into memmap shards, fixed-length windows, a resumable sampler, a data module."""

from flash_dist.data.corpus import generate_corpus, write_corpus
from flash_dist.data.datamodule import TokenDataModule
from flash_dist.data.dataset import TokenDataset, collate_tokens, document_boundaries, read_meta
from flash_dist.data.prepare import prepare
from flash_dist.data.sampler import ResumableDistributedSampler
from flash_dist.data.tokenizer import EOS_TOKEN_ID, VOCAB_SIZE, encode, gpt2_tokenizer

__all__ = ["EOS_TOKEN_ID", "ResumableDistributedSampler", "TokenDataModule", "TokenDataset", "VOCAB_SIZE",
           "collate_tokens", "document_boundaries", "encode", "generate_corpus", "gpt2_tokenizer", "prepare",
           "read_meta", "write_corpus"]
