"""Writes imagebind_text_reference.npz: ImageBind's own tokens and text embeddings for the inputs
of imagebind_inputs.py.

Run outside the project against a fetched copy of facebookresearch/ImageBind (never imported by the
tests or the package):

    python make_imagebind_reference.py REF_DIR

with ``REF_DIR/imagebind/models/*.py`` from ImageBind (``REF_DIR/imagebind/__init__.py`` emptied:
the real one imports its data module, which needs torchaudio and torchvision), ``einops`` on the
path, and stand-ins for the two names it imports from ``timm.layers`` (``trunc_normal_``, only for
initialisation; ``DropPath``, identity in eval mode) and ``iopath``'s ``g_pathmgr.open`` (= open).
The tokens are what ``imagebind.data.load_and_transform_text`` gives (one ``SimpleTokenizer`` call
per text, concatenated); the embeddings ``ImageBindModel.forward({"text": tokens})["text"]`` of a
small ImageBindModel whose text branch gets the generated weights.
"""

import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(ref_dir: str) -> None:
    sys.path[:0] = [ref_dir, HERE]
    import imagebind_inputs as inputs
    from imagebind.models.imagebind_model import ImageBindModel
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer, TextPreprocessor

    c = inputs.CONFIG
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = SimpleTokenizer(bpe_path=inputs.write_vocab(folder))
    tokens = torch.cat([tokenizer(t).unsqueeze(0) for t in inputs.TEXTS], dim=0)  # load_and_transform_text
    vocab_size = len(tokenizer.encoder)
    small = {"embed_dim": 64, "num_blocks": 1, "num_heads": 1}
    model = ImageBindModel(
        out_embed_dim=c["out_dim"],
        text_embed_dim=c["width"],
        text_num_blocks=c["layers"],
        text_num_heads=c["width"] // 64,
        **{f"{m}_{k}": v for m in ("vision", "audio", "depth", "thermal", "imu") for k, v in small.items()},
    )
    # ImageBind fixes the text vocabulary at CLIP's 49408; this one is the small file's
    model.modality_preprocessors["text"] = TextPreprocessor(
        vocab_size=vocab_size, context_length=c["context_length"], embed_dim=c["width"], causal_masking=True
    )
    weights = inputs.text_weights(vocab_size)
    text_keys = {k for k in model.state_dict() if ".text." in k}
    assert text_keys == {k for k in weights if ".text." in k}, text_keys ^ set(weights)
    model.load_state_dict({k: v for k, v in weights.items() if k in text_keys}, strict=False)
    model.eval()
    with torch.no_grad():
        embeddings = model({"text": tokens})["text"]
    np.savez_compressed(os.path.join(HERE, "imagebind_text_reference.npz"), tokens=tokens.numpy(), embeddings=embeddings.numpy())
    print(tokens[:, :12], embeddings.shape, embeddings.norm(dim=-1))


if __name__ == "__main__":
    main(sys.argv[1])
