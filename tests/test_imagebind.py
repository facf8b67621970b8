"""ImageBind's text encoder against ImageBind's own code: tokens and embeddings that its
``SimpleTokenizer`` / ``ImageBindModel.forward`` gave for seeded weights and a small BPE
vocabulary (tests/reference/make_imagebind_reference.py), loaded through the real checkpoint path."""

import os
import sys

import numpy as np
import pytest
import torch

from soundstage.models.imagebind import ClipTokenizer, ImageBindText, find_bpe_vocab

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "reference")
sys.path.insert(0, REFERENCE_DIR)
import imagebind_inputs  # noqa: E402

sys.path.remove(REFERENCE_DIR)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagebind")
    vocab = imagebind_inputs.write_vocab(folder)
    torch.save(imagebind_inputs.text_weights(len(ClipTokenizer(vocab))), folder / "imagebind.pth")
    return str(folder / "imagebind.pth"), vocab


@pytest.fixture(scope="module")
def reference():
    return np.load(os.path.join(REFERENCE_DIR, "imagebind_text_reference.npz"))


def test_tokens_equal_imagebinds_tokenizer(checkpoint, reference):
    model = ImageBindText.from_checkpoint(*checkpoint)
    tokens = model.tokenize(imagebind_inputs.TEXTS)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(imagebind_inputs.TEXTS), 77)
    np.testing.assert_array_equal(tokens.numpy(), reference["tokens"])
    assert tokens[11, -1] == tokens.max()  # the long text keeps its end token at position 76


def test_embeddings_equal_imagebind_model_forward(checkpoint, reference):
    model = ImageBindText.from_checkpoint(*checkpoint)
    got = model(imagebind_inputs.TEXTS)
    assert got.dtype == torch.float32 and got.shape == (len(imagebind_inputs.TEXTS), 64)
    np.testing.assert_allclose(got.numpy(), reference["embeddings"], atol=1e-4, rtol=0)
    # one at a time (shorter forward passes: the causal cut) gives the same
    alone = torch.cat([model([t]) for t in imagebind_inputs.TEXTS[:4]])
    np.testing.assert_allclose(alone.numpy(), reference["embeddings"][:4], atol=1e-4, rtol=0)


def test_checkpoint_and_vocabulary_errors(checkpoint, tmp_path):
    path, vocab = checkpoint
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if "mlp.fc2.bias" not in k}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="fc2.bias"):
        ImageBindText.from_checkpoint(str(tmp_path / "short.pth"), vocab)
    torch.save(dict(state, hook=np.random.default_rng), tmp_path / "code.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        ImageBindText.from_checkpoint(str(tmp_path / "code.pth"), vocab)
    from soundstage.models.tiny import train_bpe_merges, write_bpe_vocab

    other = write_bpe_vocab(tmp_path / "other.txt.gz", train_bpe_merges(["guitar"], 3))
    with pytest.raises(ValueError, match="BPE vocabulary has 517 tokens"):
        ImageBindText.from_checkpoint(path, other)
    with pytest.raises(ValueError, match="does not exist"):
        find_bpe_vocab(str(tmp_path / "missing.gz"))


def test_bpe_vocabulary_is_found_in_an_installed_package_without_importing_it(checkpoint, tmp_path, monkeypatch):
    import shutil

    package = tmp_path / "site" / "imagebind"
    (package / "bpe").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs torchvision')\n")  # as the real one, here
    shutil.copy(checkpoint[1], package / "bpe" / "bpe_simple_vocab_16e6.txt.gz")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_bpe_vocab() == str(package / "bpe" / "bpe_simple_vocab_16e6.txt.gz")
    assert len(ImageBindText.from_checkpoint(checkpoint[0]).tokenizer) == len(ClipTokenizer(checkpoint[1]))
    from soundstage.models import imagebind

    monkeypatch.setattr(imagebind, "BPE_PACKAGES", (("no_such_package_here", ""),))
    with pytest.raises(ValueError, match="no CLIP BPE vocabulary: give --bpe-vocab"):
        find_bpe_vocab()
