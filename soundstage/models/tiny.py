"""Tiny random stand-ins for every model of the pipeline, built from configs shipped in the package.

The configs are in ``soundstage/data/tiny/*.json`` (each says which real model it stands in
for). A builder makes the model from its config with seeded random weights and saves it the
way the real model is distributed — ``save_pretrained`` (weights, config, tokenizer/processor)
for the transformers models, ``torch.save`` of the official ``{"cfg", "model", "label_dict"}``
dict for BEATs, a plain state dict for VGGish — so the stages load it through the same code as a real checkpoint.

Their outputs are meaningless: they exist so that the whole pipeline runs with no download
(``soundstage demo``, tests, benchmarks). Same seed -> same weights.

``build_tiny_models(out_dir, seed=0)`` builds all of them and returns ``{name: path}``.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
    Wav2Vec2FeatureExtractor,
)

from soundstage.llm.prompt import load_template
from soundstage.models.beats import BEATs, audioset_classes
from soundstage.models.imagebind import BPE_FILE, ClipTokenizer
from soundstage.models.vggish import VGGish

TINY_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny")


def tiny_config(name: str) -> dict:
    """The shipped config ``data/tiny/<name>.json`` (without its ``_comment``)."""
    with open(os.path.join(TINY_CONFIG_DIR, f"{name}.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("_comment", None)
    return config


@cache
def _words() -> dict:
    return tiny_config("words")


#: the only words the tiny captioner can write / the tiny text models know besides the prompt
CAPTION_WORDS: tuple = tuple(_words()["caption_words"])
SOURCE_WORDS: tuple = tuple(_words()["source_words"])


def word_tokenizer(sentences, chat_template=None, wrap=False):
    """A fast word-level tokenizer trained on ``sentences`` (split at whitespace and punctuation);
    ``wrap``: encoding adds [BOS] ... [EOS] around the text, as CLIP's tokenizer does."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    if wrap:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _seeded(seed: int, make):
    """``make()`` under ``torch.manual_seed(seed)`` without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# ------------------------------------------------------------------------------- audio models


def tiny_hubert_config(layer_norm_first: bool = False, **overrides):
    """``data/tiny/hubert.json``'s transformers ``HubertConfig``. ``layer_norm_first=True`` gives
    the large-style variant (layer-norm conv stack with biases, pre-LN blocks, as
    ``facebook/hubert-large-ll60k``); tests build other variants with ``overrides``."""
    settings = dict(tiny_config("hubert")["config"])
    if layer_norm_first:
        settings.update(conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True)
    return HubertConfig(**{**settings, **overrides})


def build_hubert(out_dir, seed: int = 0) -> str:
    """A transformers HuBERT directory (weights, config, preprocessor_config.json) like
    ``facebook/hubert-base-ls960``'s."""
    model = _seeded(seed, lambda: HubertModel(tiny_hubert_config()))
    model.save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(**tiny_config("hubert")["feature_extractor"]).save_pretrained(out_dir)
    return str(out_dir)


def beats_label_dict(display_names) -> dict:
    """Column -> AudioSet MID for these display names of the shipped AudioSet class list."""
    mid_of = {name: mid for mid, name in audioset_classes()}
    unknown = [n for n in display_names if n not in mid_of]
    if unknown:
        raise ValueError(f"not AudioSet display names: {unknown}")
    return {i: mid_of[name] for i, name in enumerate(display_names)}


def tiny_beats_cfg(**overrides) -> dict:
    """``data/tiny/beats.json``'s cfg (the dict official BEATs checkpoints carry), with ``overrides``
    (tests build variants: other bucket settings, a pre-trained model, 527 classes)."""
    return {**tiny_config("beats")["cfg"], **overrides}


def build_beats(path, seed: int = 0) -> str:
    """An official-format fine-tuned BEATs checkpoint file (``{"cfg", "model", "label_dict"}``)."""
    spec = tiny_config("beats")
    if spec["cfg"]["predictor_class"] != len(spec["classes"]):
        raise ValueError("data/tiny/beats.json: predictor_class must equal the number of classes")
    model = _seeded(seed, lambda: BEATs(tiny_beats_cfg()))
    model.label_dict = beats_label_dict(spec["classes"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save_checkpoint(path)
    return str(path)


def build_vggish(path, seed: int = 0) -> str:
    """A torchvggish-layout state dict ``.pth`` (``features.N.*``, ``embeddings.N.*``) of a
    narrow VGGish, as ``vggish-10086976.pth`` is distributed."""
    spec = tiny_config("vggish")
    model = _seeded(seed, lambda: VGGish(spec["layers"], spec["hidden"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path)


# ------------------------------------------------------------------------- text/vision models


def build_blip(out_dir, seed: int = 0) -> str:
    """A BLIP captioner directory (model + processor) with a BERT word-piece tokenizer over
    the caption words."""
    # here: importing BLIP's image processor makes transformers warn (no torchvision) on every import of this module
    from transformers import BlipImageProcessor, BlipProcessor

    spec = tiny_config("blip")
    vocab = spec["special_tokens"] + list(CAPTION_WORDS)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    size = spec["image_size"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer)
    text_config = dict(
        spec["config"]["text_config"],
        vocab_size=len(vocab),
        bos_token_id=vocab.index("[DEC]"),
        sep_token_id=vocab.index("[SEP]"),
        pad_token_id=vocab.index("[PAD]"),
    )
    config = BlipConfig(**{**spec["config"], "text_config": text_config})
    _seeded(seed, lambda: BlipForConditionalGeneration(config)).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)


def build_chat_lm(out_dir, seed: int = 0, **config_overrides) -> str:
    """A Llama-architecture chat LM directory whose tokenizer (with a chat template) covers the
    sources prompt template and the caption words. ``config_overrides``: e.g. ``hidden_size``."""
    spec = tiny_config("chat_lm")
    tokenizer = word_tokenizer(
        [load_template().text, " ".join(CAPTION_WORDS), " ".join(SOURCE_WORDS), spec["extra_text"]], spec["chat_template"]
    )
    settings = {**spec["config"], **config_overrides}
    settings.setdefault("intermediate_size", 2 * settings["hidden_size"])
    config = LlamaConfig(
        **settings,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seeded(seed, lambda: LlamaForCausalLM(config)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_text_encoder(out_dir, seed: int = 0) -> str:
    """A RoBERTa text encoder directory (the architecture of distilroberta-base)."""
    tokenizer = word_tokenizer([" ".join(SOURCE_WORDS + CAPTION_WORDS)])
    config = RobertaConfig(
        **tiny_config("text_encoder")["config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
    )
    _seeded(seed, lambda: RobertaModel(config)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_clip(out_dir, seed: int = 0) -> str:
    """A CLIP dual encoder directory; textcues uses its text tower (pooler output: the final
    state at the end-of-text token) or its projected text embedding."""
    tokenizer = word_tokenizer([" ".join(SOURCE_WORDS + CAPTION_WORDS)], wrap=True)
    spec = tiny_config("clip")["config"]
    text_config = dict(
        spec["text_config"],
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = CLIPConfig(**{**spec, "text_config": text_config})
    _seeded(seed, lambda: CLIPModel(config)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def train_bpe_merges(words, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` the way CLIP's vocabulary was made: symbols are
    characters, a word's last one marked ``</w>``; repeatedly the most frequent adjacent pair
    (ties: the smallest) is merged, ``count`` times or until no pair is left."""
    corpus = {}
    for word in words:
        symbols = (*word[:-1], word[-1] + "</w>")
        corpus[symbols] = corpus.get(symbols, 0) + 1
    merges = []
    while len(merges) < count:
        pairs = {}
        for symbols, n in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols, n in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        corpus = merged
    return merges


def write_bpe_vocab(path, merges) -> str:
    """A vocabulary file in the layout of CLIP's ``bpe_simple_vocab_16e6.txt.gz``: a version line,
    then one merge per line (no trailing newline: the tokenizer reads lines 1 .. 48894 as merges)."""
    text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def build_imagebind_text(path, seed: int = 0) -> str:
    """A checkpoint ``path`` with the text keys of ``imagebind_huge.pth`` (ImageBind's names for
    them) and its BPE vocabulary ``bpe_simple_vocab_16e6.txt.gz`` beside it."""
    spec = tiny_config("imagebind_text")
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    words = [w.lower() for w in SOURCE_WORDS + CAPTION_WORDS] + ["none"]
    bpe = write_bpe_vocab(os.path.join(out_dir, BPE_FILE), train_bpe_merges(words, spec["bpe_merges"]))
    c = spec["config"]
    vocab = len(ClipTokenizer(bpe))

    def make():
        state = {
            "modality_preprocessors.text.token_embedding.weight": 0.02 * torch.randn(vocab, c["width"]),
            "modality_preprocessors.text.pos_embed": 0.01 * torch.randn(1, c["context_length"], c["width"]),
            "modality_preprocessors.text.mask": torch.full((c["context_length"],) * 2, float("-inf")).triu(1),
            "modality_heads.text.proj.0.weight": 1 + 0.1 * torch.randn(c["width"]),
            "modality_heads.text.proj.0.bias": 0.1 * torch.randn(c["width"]),
            "modality_heads.text.proj.1.weight": torch.randn(c["out_dim"], c["width"]) / c["width"] ** 0.5,
            "modality_postprocessors.text.1.log_logit_scale": torch.tensor(c["logit_scale"]).log(),
        }
        w, m = c["width"], c["mlp_width"]
        for i in range(c["layers"]):
            block = f"modality_trunks.text.blocks.{i}."
            for name, shape, scale in [
                ("attn.in_proj_weight", (3 * w, w), w**-0.5),
                ("attn.in_proj_bias", (3 * w,), 0.02),
                ("attn.out_proj.weight", (w, w), w**-0.5),
                ("attn.out_proj.bias", (w,), 0.02),
                ("mlp.fc1.weight", (m, w), w**-0.5),
                ("mlp.fc1.bias", (m,), 0.02),
                ("mlp.fc2.weight", (w, m), m**-0.5),
                ("mlp.fc2.bias", (w,), 0.02),
                ("norm_1.bias", (w,), 0.1),
                ("norm_2.bias", (w,), 0.1),
            ]:
                state[block + name] = scale * torch.randn(shape)
            for norm in ("norm_1", "norm_2"):
                state[f"{block}{norm}.weight"] = 1 + 0.1 * torch.randn(w)
        return state

    torch.save(_seeded(seed, make), path)
    return str(path)


# ----------------------------------------------------------------------------------- all of them

#: name -> (builder, file name under out_dir, the real model it stands in for)
TINY_MODELS = {
    "hubert": (build_hubert, "hubert", "facebook/hubert-base-ls960"),
    "beats": (build_beats, "beats_tiny.pt", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"),
    "vggish": (build_vggish, "vggish_tiny.pth", "vggish-10086976.pth (torchvggish release v0.1)"),
    "blip": (build_blip, "blip", "Salesforce/blip-image-captioning-large"),
    "chat_lm": (build_chat_lm, "chat_lm", "Qwen/Qwen2.5-7B-Instruct"),
    "imagebind_text": (build_imagebind_text, "imagebind_text/imagebind_text.pth", "imagebind_huge.pth (ImageBind-Huge)"),
}


def build_tiny_models(out_dir, seed: int = 0, names=None) -> dict[str, str]:
    """Build the tiny models ``names`` (default: all of ``TINY_MODELS``) under ``out_dir``;
    returns ``{name: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    return {name: TINY_MODELS[name][0](tiny_model_path(out_dir, name), seed=seed) for name in names or TINY_MODELS}


def tiny_model_path(out_dir, name: str) -> str:
    """Where ``build_tiny_models(out_dir)`` puts the model ``name``."""
    return os.path.join(out_dir, TINY_MODELS[name][1])
