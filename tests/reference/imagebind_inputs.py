"""The inputs of the stored ImageBind text reference (``imagebind_text_reference.npz``): a small
BPE vocabulary file, seeded random weights under ImageBind's key names, and texts that exercise the
tokenizer's cleaning (ftfy, HTML entities, whitespace, case, digits, apostrophes, non-ASCII, a text
over 77 tokens, the empty text, SegPref's "None" slot).

The script that ran ImageBind's own code on them (``make_imagebind_reference.py``, outside the
project) and the tests build exactly the same inputs from this file.
"""

import numpy as np
import torch

from soundstage.models.tiny import train_bpe_merges, write_bpe_vocab

CORPUS = (
    "guitar man woman dog piano violin drum car bird baby trumpet cello none people playing "
    "the a of and singing engine barking crowd water music helicopter train"
).split()
MERGES = 120
CONFIG = {"width": 192, "layers": 2, "mlp_width": 768, "out_dim": 64, "context_length": 77}  # 3 heads of 64

TEXTS = [
    "guitar",
    "None",
    "man",
    "a dog barking",
    "Guitar, MAN & the Piano!",
    "Tom &amp;amp; Jerry",
    "  spaces\tand\n\nnewlines  ",
    "it's 3 trumpets'",
    "café naïve",
    "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "",
    "helicopter " * 100,
    "xylophone zebra",
]


def write_vocab(folder) -> str:
    return write_bpe_vocab(f"{folder}/bpe_simple_vocab_16e6.txt.gz", train_bpe_merges(CORPUS, MERGES))


def text_weights(vocab_size: int, seed: int = 0) -> dict:
    """``{ImageBind key: float32 tensor}`` of the text branch, plus two keys of other modalities."""
    rng = np.random.default_rng(seed)
    w, m, out, ctx = CONFIG["width"], CONFIG["mlp_width"], CONFIG["out_dim"], CONFIG["context_length"]

    def normal(shape, scale, offset=0.0):
        return torch.from_numpy(offset + scale * rng.standard_normal(shape, np.float32))

    state = {
        "modality_preprocessors.text.token_embedding.weight": normal((vocab_size, w), 0.3),
        "modality_preprocessors.text.pos_embed": normal((1, ctx, w), 0.1),
        "modality_preprocessors.text.mask": torch.full((ctx, ctx), float("-inf")).triu(1),
    }
    for i in range(CONFIG["layers"]):
        block = f"modality_trunks.text.blocks.{i}."
        state.update(
            {
                block + "attn.in_proj_weight": normal((3 * w, w), w**-0.5),
                block + "attn.in_proj_bias": normal(3 * w, 0.1),
                block + "attn.out_proj.weight": normal((w, w), w**-0.5),
                block + "attn.out_proj.bias": normal(w, 0.1),
                block + "norm_1.weight": normal(w, 0.2, 1.0),
                block + "norm_1.bias": normal(w, 0.1),
                block + "mlp.fc1.weight": normal((m, w), w**-0.5),
                block + "mlp.fc1.bias": normal(m, 0.1),
                block + "mlp.fc2.weight": normal((w, m), m**-0.5),
                block + "mlp.fc2.bias": normal(w, 0.1),
                block + "norm_2.weight": normal(w, 0.2, 1.0),
                block + "norm_2.bias": normal(w, 0.1),
            }
        )
    state.update(
        {
            "modality_heads.text.proj.0.weight": normal(w, 0.2, 1.0),
            "modality_heads.text.proj.0.bias": normal(w, 0.1),
            "modality_heads.text.proj.1.weight": normal((out, w), w**-0.5),
            "modality_postprocessors.text.1.log_logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32),
            # other modalities: present in imagebind_huge.pth, ignored by the text encoder
            "modality_trunks.vision.blocks.0.attn.in_proj_weight": normal((9, 3), 1.0),
            "modality_postprocessors.audio.1.log_logit_scale": torch.tensor(3.0),
        }
    )
    return state
