"""Tiny text/vision-language models for the caption / sources / textcues tests and the generation
benchmark: the package's builders (``soundstage.models.tiny``, configs in ``soundstage/data/tiny``)
under the names these tests use. Random weights, seeded; saved with save_pretrained and loaded
through the same ``from_pretrained`` path as real checkpoints.
"""

from soundstage.models import tiny
from soundstage.models.tiny import CAPTION_WORDS, SOURCE_WORDS, build_blip, build_clip, word_tokenizer  # noqa: F401

build_roberta = tiny.build_text_encoder


def build_chat_lm(out_dir, hidden=32, layers=2, heads=4, seed=0) -> str:
    """The tiny Llama chat LM, optionally wider/deeper (the generation benchmark varies these)."""
    return tiny.build_chat_lm(
        out_dir,
        seed=seed,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
    )
