"""ImageBind's text encoder (``imagebind_huge.pth``, text branch) and its CLIP BPE tokenizer.

SegPref embeds its text cues with ``ImageBindModel.forward`` on ``load_and_transform_text``; this
module computes the same numbers without the ImageBind code base (which needs torchvision,
torchaudio, pytorchvideo and timm):

Tokenizer (``ClipTokenizer``, ImageBind's ``SimpleTokenizer``): the text is cleaned with
``ftfy.fix_text``, HTML-unescaped twice, stripped, whitespace runs collapsed to one space and
lower-cased; split by CLIP's pattern (``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``);
each piece's UTF-8 bytes mapped to printable characters and merged by the BPE ranks of the
vocabulary file's lines 1 .. 48894 (``bpe_simple_vocab_16e6.txt.gz``). Vocabulary = the 256 byte
characters, the same with ``</w>``, one token per merge, then ``<|startoftext|>`` and
``<|endoftext|>`` (ids 49406, 49407 in CLIP's). Each text becomes ``[sot] + tokens[:75] + [eot]``,
zero-padded to 77 (ImageBind since its Nov 2025 fix; before it, a text over 75 tokens lost its
end token — no source name is that long).

Network (``ImageBindText``), keys of the checkpoint in brackets:

- token embedding [``modality_preprocessors.text.token_embedding.weight``] plus a learned
  positional embedding [``...text.pos_embed`` ``[1, 77, D]``];
- ``L`` pre-LayerNorm blocks [``modality_trunks.text.blocks.N.*``]:
  ``x + attn(norm_1(x))`` then ``x + mlp(norm_2(x))``; LayerNorm eps 1e-6; attention =
  ``torch.nn.MultiheadAttention`` (``attn.in_proj_weight/bias``, ``attn.out_proj.*``) with the
  additive causal mask (-inf above the diagonal), no bias_kv, no dropout, no drop-path for text;
  MLP = Linear(D, 4D), exact GELU, Linear(4D, D) (``mlp.fc1``, ``mlp.fc2``); no final LayerNorm in
  the trunk;
- the end-of-text token's state, found as ``argmax`` of the token ids (the end token has the
  highest id), through LayerNorm (eps 1e-6) and a bias-free Linear(D, out)
  [``modality_heads.text.proj.0.*``, ``.proj.1.weight``] (``SelectEOSAndProject``);
- L2 normalisation times ``min(exp(log_logit_scale), 100)``
  [``modality_postprocessors.text.1.log_logit_scale``] (``Normalize`` + ``LearnableLogitScaling``).

ImageBind-Huge: D = 1024, 24 blocks, 16 heads, out 1024, vocabulary 49408. The sizes are read from
the checkpoint; heads = D / 64 (ImageBind's and CLIP's head width), so tiny stand-ins with the same
key layout load through the same code. Keys of the other modalities are ignored.

Because the mask is causal, positions after a batch's last end token cannot change any pooled
state: the forward pass stops there (a few tokens for a source name instead of 77).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import cache

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

CONTEXT_LENGTH = 77
HEAD_WIDTH = 64
LAYER_NORM_EPS = 1e-6
MAX_LOGIT_SCALE = 100.0
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
#: merges CLIP's tokenizer takes from the vocabulary file (its lines 1 .. 48894)
MERGE_COUNT = 49152 - 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"

#: where an installed package ships CLIP's vocabulary (found without importing the package, whose
#: import needs torchvision): ImageBind, OpenCLIP, OpenAI's clip
BPE_PACKAGES = (("imagebind", "bpe"), ("open_clip", ""), ("clip", ""))

TEXT_PREFIXES = {
    "modality_preprocessors.text.": "preprocessor.",
    "modality_trunks.text.": "trunk.",
    "modality_heads.text.": "head.",
    "modality_postprocessors.text.": "postprocessor.",
}


# ----------------------------------------------------------------------------- tokenizer


def find_bpe_vocab(path: str | None = None) -> str:
    """``path``, or CLIP's ``bpe_simple_vocab_16e6.txt.gz`` from an installed package that ships it."""
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"BPE vocabulary {path} does not exist")
        return path
    for package, folder in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = os.path.join(location, folder, BPE_FILE)
            if os.path.isfile(candidate):
                return candidate
    raise ValueError(
        f"no CLIP BPE vocabulary: give --bpe-vocab PATH to {BPE_FILE} "
        "(ImageBind ships it as imagebind/bpe/, OpenCLIP as open_clip/)"
    )


@cache
def byte_characters() -> dict[int, str]:
    """CLIP's reversible map of the 256 byte values onto printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def clean(text: str) -> str:
    """ftfy, HTML unescaped twice, whitespace runs -> one space, stripped, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """CLIP's byte-level BPE as ImageBind's ``SimpleTokenizer`` applies it (see the module doc)."""

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
    )

    def __init__(self, bpe_path: str, context_length: int = CONTEXT_LENGTH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
        vocab = list(byte_characters().values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.size = len(vocab)
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.context_length = context_length
        self._pieces = {START: START, END: END}

    def __len__(self) -> int:
        return self.size

    def bpe(self, piece: str) -> list[str]:
        """The merged symbols of one pre-tokenised piece (last symbol marked ``</w>``)."""
        if piece not in self._pieces:
            word = [*piece[:-1], piece[-1] + "</w>"]
            while len(word) > 1:
                pairs = set(zip(word, word[1:]))
                best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                        merged.append(word[i] + word[i + 1])
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self._pieces[piece] = " ".join(word)
        return self._pieces[piece].split(" ")

    def encode(self, text: str) -> list[int]:
        to_chars = byte_characters()
        ids = []
        for piece in self.PATTERN.findall(clean(text)):
            ids += [self.encoder[s] for s in self.bpe("".join(to_chars[b] for b in piece.encode("utf-8")))]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """``[N, 77]`` int64: start token, at most 75 text tokens, end token, zeros."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.encoder[START], *self.encode(text)[: self.context_length - 2], self.encoder[END]]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------- network


class Block(nn.Module):
    """ImageBind's ``BlockWithMasking`` as the text trunk builds it (pre-LN, causal attention)."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=True, batch_first=True)
        self.norm_1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, mlp_width), nn.Linear(mlp_width, width)
        self.norm_2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x, mask):
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm_2(x))))


class LogitScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_logit_scale = nn.Parameter(torch.zeros(()))


def text_config(state: dict) -> dict:
    """Sizes of the text branch of an ImageBind state dict (keys already without the prefix)."""
    try:
        vocab, width = state["preprocessor.token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("trunk.blocks."))
        return {
            "vocab_size": int(vocab),
            "width": int(width),
            "context_length": int(state["preprocessor.pos_embed"].shape[1]),
            "layers": layers,
            "heads": max(1, int(width) // HEAD_WIDTH),
            "mlp_width": int(state["trunk.blocks.0.mlp.fc1.weight"].shape[0]),
            "out_dim": int(state["head.proj.1.weight"].shape[0]),
        }
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not an ImageBind text encoder: missing or malformed {e}") from None


class ImageBindText(nn.Module):
    """ImageBind's text branch: ``model(texts)`` -> ``[N, out_dim]`` float32, as
    ``ImageBindModel.forward({"text": load_and_transform_text(texts)})["text"]``."""

    def __init__(self, tokenizer: ClipTokenizer, vocab_size, width, context_length, layers, heads, mlp_width, out_dim):
        super().__init__()
        if len(tokenizer) != vocab_size:
            raise ValueError(f"the BPE vocabulary has {len(tokenizer)} tokens, the checkpoint's embedding {vocab_size}")
        self.tokenizer = tokenizer
        self.preprocessor = nn.Module()
        self.preprocessor.token_embedding = nn.Embedding(vocab_size, width)
        self.preprocessor.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList(Block(width, heads, mlp_width) for _ in range(layers))
        self.head = nn.Module()
        self.head.proj = nn.Sequential(nn.LayerNorm(width, eps=LAYER_NORM_EPS), nn.Linear(width, out_dim, bias=False))
        self.postprocessor = nn.ModuleDict({"1": LogitScale()})  # index 0 is ImageBind's parameter-free Normalize

    @classmethod
    def from_checkpoint(cls, path: str, bpe_vocab: str | None = None, map_location="cpu") -> ImageBindText:
        """The text branch of an ImageBind checkpoint (``imagebind_huge.pth``: a state dict), loaded
        with ``weights_only=True`` (memory-mapped: the other modalities' weights are never read)."""
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError:  # an old (non-zip) serialisation cannot be memory-mapped
            state = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a state dict (expected ImageBind's imagebind_huge.pth layout)")
        text = {}
        for key, value in state.items():
            for prefix, ours in TEXT_PREFIXES.items():
                if key.startswith(prefix):
                    text[ours + key[len(prefix) :]] = value
        text.pop("preprocessor.mask", None)  # the causal mask buffer: rebuilt, it is fixed
        try:
            model = cls(ClipTokenizer(find_bpe_vocab(bpe_vocab)), **text_config(text))
            model.load_state_dict(text, strict=True)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: {e}") from None
        return model.eval()

    @property
    def device(self):
        return self.preprocessor.pos_embed.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, 77]`` token ids -> ``[N, out_dim]`` embeddings."""
        end = tokens.argmax(dim=-1)
        length = int(end.max()) + 1  # causal: later positions cannot reach any end token's state
        x = self.preprocessor.token_embedding(tokens[:, :length]) + self.preprocessor.pos_embed[:, :length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        for block in self.trunk.blocks:
            x = block(x, mask)
        pooled = self.head.proj(x[torch.arange(len(x), device=x.device), end])
        scale = self.postprocessor["1"].log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return F.normalize(pooled, dim=-1, p=2) * scale

    def forward(self, texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return self.encode_tokens(self.tokenize(texts).to(self.device)).float()
