"""Writes vggish_reference.npz: the reference code's embeddings for the inputs of vggish_inputs.py.

Run outside the project, against fetched copies of the reference code (never imported by the
tests or the package):

    python make_vggish_reference.py REF_DIR

with ``REF_DIR/torchvggish/`` = harritaylor/torchvggish's ``torchvggish`` package and
``REF_DIR/towhee_vggish/torch_vggish.py`` = towhee's ``towhee/models/vggish/torch_vggish.py``.
torchvggish's ``wavfile_to_examples`` gives the examples (int16 / 32768, channel mean, resampy
``kaiser_best``); towhee's operator feeds its ``VGG`` the same examples for 16-bit WAV.
"""

import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(ref_dir: str) -> None:
    sys.path[:0] = [ref_dir, HERE]
    import vggish_inputs
    from torchvggish import vggish as torchvggish
    from torchvggish import vggish_input
    from towhee_vggish.torch_vggish import VGG as TowheeVGG

    state = {k: torch.from_numpy(v) for k, v in vggish_inputs.full_size_weights(0).items()}
    networks = {"torchvggish": torchvggish.VGG(torchvggish.make_layers()), "towhee": TowheeVGG()}
    for network in networks.values():
        network.load_state_dict(state)
        network.eval()
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for sr, ch in vggish_inputs.FILES:
            examples = vggish_input.wavfile_to_examples(vggish_inputs.write_file(folder, sr, ch))
            with torch.no_grad():
                for name, network in networks.items():
                    out[f"{name}_{sr}_{ch}"] = network(examples).numpy()
    np.savez_compressed(os.path.join(HERE, "vggish_reference.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
