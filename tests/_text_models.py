"""Tiny text/vision-language models built from configs, saved with save_pretrained, for the
caption / sources / textcues tests and the generation benchmark. Random weights, seeded.

Loading goes through the same ``from_pretrained`` path as real checkpoints. ``initializer_range``
is large so that outputs depend visibly on the input (a default-initialised tiny model tends to
say the same thing whatever it is given, which would hide padding bugs).
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                          BlipProcessor, CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, RobertaConfig, RobertaModel)

from soundstage.llm.prompt import load_template

CAPTION_WORDS = ("a an the man woman dog cat guitar piano drum car bird baby plays playing on in with "
                 "stage park street room two red blue small large picture of sitting next to").split()
SOURCE_WORDS = "guitar man dog piano violin drum car bird baby trumpet cello tuba electric acoustic".split()
CHAT_TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def word_tokenizer(sentences, chat_template=None, wrap=False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``sentences`` (split at whitespace and punctuation);
    ``wrap``: encoding adds [BOS] ... [EOS] around the text, as CLIP's tokenizer does."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    if wrap:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                           special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                   unk_token="[UNK]")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_chat_lm(out_dir, hidden=32, layers=2, heads=4, seed=0) -> str:
    """A Llama-architecture chat LM whose vocabulary covers the prompt template and captions."""
    tokenizer = word_tokenizer([load_template().text, " ".join(CAPTION_WORDS), " ".join(SOURCE_WORDS),
                                'ANSWER: ["guitar", "man"] Frame user assistant'], CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.5)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_blip(out_dir, seed=0) -> str:
    """A BLIP captioner on 32x32 images with a BERT word-piece tokenizer over CAPTION_WORDS."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + CAPTION_WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.5),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=vocab.index("[DEC]"),
                         sep_token_id=vocab.index("[SEP]"), pad_token_id=0, encoder_hidden_size=32,
                         initializer_range=0.5),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def build_roberta(out_dir, seed=0) -> str:
    """A RoBERTa text encoder over SOURCE_WORDS (the architecture of distilroberta-base)."""
    tokenizer = word_tokenizer([" ".join(SOURCE_WORDS + CAPTION_WORDS)])
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id)
    RobertaModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_clip(out_dir, seed=0) -> str:
    """A CLIP dual encoder; textcues uses its text tower (its pooler output is the final state at
    the end-of-text token) or its projected text embedding."""
    tokenizer = word_tokenizer([" ".join(SOURCE_WORDS + CAPTION_WORDS)], wrap=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
