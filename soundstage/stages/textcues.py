"""textcues: each frame's inferred sound sources embedded by a text encoder, in fixed slots.

The last step of the segmentation-preference text cues (SegPref, ECCV 2024): frame i gets
``n_slots`` slots (4, as the original); slot j holds the embedding of the j-th source name the
``sources`` stage found for that frame, in its order; names beyond ``n_slots`` are cut. With
``--slots masked`` (default) a slot without a name — fewer names, an empty list, or an answer
whose status is not ``ok`` — is masked (``cue_mask`` false) and holds zeros: never random numbers
(the original loader's fallback for a missing file).

``--slots segpref`` forms the slots as SegPref does from its cue JSON (what ``export
segpref-json`` writes): the frame's cue string ``"guitar,man,None,None,"`` (names cut to
``n_slots``, padded with "None", commas inside a name turned into spaces) read back as
``f"{cue}None".split(",")``, first ``n_slots``, padded with "None" — and the word "None" is
embedded like a name (SegPref's model attends to all four slots). Every slot is then unmasked and
``cue_names`` says "None" where no source was found.

``--encoder`` given an ImageBind checkpoint file (``imagebind_huge.pth``; a transformers model is
a directory or a hub id) embeds each slot text with ImageBind's text encoder
(``soundstage.models.imagebind``: what ``ImageBindModel.forward`` on ``load_and_transform_text``
gives, ``[1024]`` per text for ImageBind-Huge), SegPref's text features; ``--bpe-vocab`` is CLIP's
``bpe_simple_vocab_16e6.txt.gz`` (default: found in an installed imagebind / open_clip / clip
package). SegPref's recipe: ``--encoder imagebind_huge.pth --slots segpref``.

Otherwise each name is encoded alone by ``--encoder`` (any transformers text model: a CLIP text tower,
``distilbert/distilroberta-base`` as in Ref-AVS, ...) and pooled by ``--pooling``:
``mean`` (default) averages the last hidden states over the name's tokens (attention mask);
``pooler`` takes the model's ``pooler_output`` (for CLIP: the final state at the end token);
``projected`` takes a dual encoder's text embedding (``get_text_features``: CLIP's pooler output
through its text projection, the space its image embeddings live in).

Stored in shape: ``cues [frames, n_slots, dim]`` float16 and ``cue_mask [frames, n_slots]``;
``cue_names`` (strings) is ``[frames, n_slots]`` row-major, '' where masked.
"""

import dataclasses
import json
import os

import numpy as np
import torch

from soundstage.device import device_param, dtype_param, resolve_device, torch_dtype
from soundstage.models.imagebind import ImageBindText
from soundstage.pipeline.identity import model_identity, model_source
from soundstage.pipeline.stage import ClipError, Field, Param, Stage, Upstream

DEFAULT_ENCODER = "distilbert/distilroberta-base"
SLOT_RULES = ("masked", "segpref")
NONE = "None"  # SegPref's filler slot text


def is_imagebind(encoder: str) -> bool:
    """An ImageBind checkpoint is one file; a transformers model is a directory or a hub id."""
    return os.path.isfile(encoder)


def segpref_frame_text(names: list, n_slots: int) -> str:
    """``guitar,man,None,None,`` — names cut to ``n_slots`` and padded with None (0: no padding)."""
    names = [n.replace(",", " ") for n in names]  # a comma would split one name into two
    if n_slots:
        names = names[:n_slots] + [NONE] * max(0, n_slots - len(names))
    return "".join(f"{n}," for n in names)


def segpref_slots(cue: str, n_slots: int) -> list[str]:
    """SegPref's slot texts of a frame's cue string: ``f"{cue}None".split(",")``, first
    ``n_slots``, padded with "None"."""
    texts = f"{cue}{NONE}".split(",")[:n_slots]
    return texts + [NONE] * (n_slots - len(texts))


def frame_names(record: dict, which: str) -> list[list[str]]:
    """The source names of each frame of a ``sources`` record; [] where the status is not ok."""
    column = "sources" if which == "raw" else "vocab_sources"
    out = []
    for status, names in zip(record["status"], record[column]):
        names = json.loads(names) if status == "ok" else None
        if status == "ok" and names is None and which == "vocab":
            raise ClipError("the sources output has no vocabulary mapping (run sources with --vocabulary)")
        # vocab: names below the score are null, and two names may map onto one class
        out.append(list(dict.fromkeys(n for n in names or [] if n)))
    return out


def load(row, ctx):
    try:
        record = ctx.upstream["sources"][row["clip_id"]]
    except KeyError:
        raise ClipError("no sources for this clip in the chosen sources output") from None
    return frame_names(record, ctx.params["names"])


class ImageBindEncoder:
    """ImageBind's text encoder from a checkpoint file: texts -> ``[N, out_dim]`` float32."""

    def __init__(self, params):
        self.model = ImageBindText.from_checkpoint(params["encoder"], params["bpe_vocab"] or None)
        self.model.to(resolve_device(params["device"]))
        self.batch_size = params["encoder_batch_size"]

    def __call__(self, names: list[str]) -> np.ndarray:
        return np.concatenate(
            [self.model(names[start : start + self.batch_size]).cpu().numpy() for start in range(0, len(names), self.batch_size)]
        )


def setup(params):
    return ImageBindEncoder(params) if is_imagebind(params["encoder"]) else TextEncoder(params)


class TextEncoder:
    """A transformers text model turning names into one vector each."""

    def __init__(self, params):
        from transformers import AutoModel, AutoTokenizer  # heavy; only for a transformers encoder, not ImageBind

        self.device = resolve_device(params["device"])
        source = model_source(params["encoder"], "--encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token is None:  # GPT-like tokenizers: padded positions are masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModel.from_pretrained(source, dtype=torch_dtype(params["dtype"]))
        self.pooling = params["pooling"]
        if self.pooling == "projected" and not hasattr(model, "get_text_features"):
            raise ValueError(f"{params['encoder']} has no projected text features; use --pooling mean or pooler")
        if self.pooling != "projected":
            # a full CLIP-like checkpoint (image + text): use its text tower
            model = getattr(model, "text_model", model)
        self.model = model.to(self.device).eval()
        self.batch_size = params["encoder_batch_size"]

    def __call__(self, names: list[str]) -> np.ndarray:
        vectors = []
        for start in range(0, len(names), self.batch_size):
            enc = self.tokenizer(
                names[start : start + self.batch_size], padding=True, truncation=True, max_length=32, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                pooled = self._pool(enc["input_ids"], enc["attention_mask"])
            vectors.append(pooled.float().cpu().numpy())
        return np.concatenate(vectors)

    def _pool(self, input_ids, attention_mask):
        if self.pooling == "projected":  # a tensor (transformers 4) or an output whose pooler is projected (5)
            out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
            return out if torch.is_tensor(out) else out.pooler_output
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            return out.pooler_output
        weights = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * weights).sum(1) / weights.sum(1).clamp(min=1)


def slot_texts(names: list[str], n_slots: int, rule: str) -> list[str]:
    """The texts in a frame's slots: its names (masked: the rest stay empty), or SegPref's slots."""
    return segpref_slots(segpref_frame_text(names, n_slots), n_slots) if rule == "segpref" else names[:n_slots]


def embed_frames(encode, items: list, n_slots: int, rule: str = "masked") -> list[dict]:
    """Slots of every clip in ``items`` (lists of per-frame name lists); each text encoded once."""
    items = [[slot_texts(names, n_slots, rule) for names in frames] for frames in items]
    unique = sorted({name for frames in items for names in frames for name in names})
    table = dict(zip(unique, encode(unique))) if unique else {}
    dim = next(iter(table.values())).shape[0] if table else encode(["none"]).shape[1]
    results = []
    for frames in items:
        cues = np.zeros((len(frames), n_slots, dim), np.float32)
        mask = np.zeros((len(frames), n_slots), bool)
        slot_names = [[""] * n_slots for _ in frames]
        for i, names in enumerate(frames):
            for j, name in enumerate(names):
                cues[i, j], mask[i, j], slot_names[i][j] = table[name], True, name
        results.append(
            {"cues": cues.astype(np.float16), "cue_mask": mask, "cue_names": [n for names in slot_names for n in names]}
        )
    return results


def process(encoder, items, params):
    return embed_frames(encoder, items, params["n_slots"], params["slots"])


STAGE = Stage(
    name="textcues",
    reads=(),  # no manifest column: its inputs are the upstream clips
    version=2,  # 2: cues and cue_mask stored in shape; no n_slots/dim fields
    help="Each frame's inferred sound sources embedded by a text encoder into n_slots masked slots.",
    upstream=[Upstream("sources", "sources")],
    params=[
        Param(
            "encoder",
            str,
            DEFAULT_ENCODER,
            "hub id or local directory of a transformers text model, or an ImageBind checkpoint file (imagebind_huge.pth)",
            identity=model_identity,
        ),
        Param(
            "bpe_vocab",
            str,
            None,
            "ImageBind encoder: CLIP's bpe_simple_vocab_16e6.txt.gz (default: from an installed imagebind/open_clip/clip package)",
            identity=model_identity,
            omit_default=True,
            applies=lambda p: is_imagebind(p["encoder"]),
        ),
        Param(
            "slots",
            str,
            "masked",
            "masked: a slot per name, empty ones zero and masked; segpref: SegPref's slots, 'None' embedded in empty ones",
            choices=SLOT_RULES,
            omit_default=True,
        ),
        Param(
            "pooling",
            str,
            "mean",
            "mean: masked mean of the last hidden states; pooler: pooler_output; projected: a CLIP-like model's text embedding",
            choices=("mean", "pooler", "projected"),
            applies=lambda p: not is_imagebind(p["encoder"]),
        ),
        Param("n_slots", int, 4, "slots per frame; names beyond are cut, missing ones masked"),
        Param(
            "names", str, "raw", "raw: the LLM's names; vocab: their mapping onto the dataset classes", choices=("raw", "vocab")
        ),
        dataclasses.replace(
            dtype_param(help="transformers encoder weights dtype (ImageBind runs in float32)"),
            applies=lambda p: not is_imagebind(p["encoder"]),
        ),
        device_param(),
        Param("encoder_batch_size", int, 256, "names per encoder call", fingerprint=False),
    ],
    fields=[
        Field("cues", "float16", (None, None, None), "[frames, n_slots, dim]; 0 where masked"),
        Field("cue_mask", "bool", (None, None), "[frames, n_slots]: slot holds a name"),
        Field("cue_names", "str", (None,), "[frames, n_slots] row-major: the name in each slot, '' if masked"),
    ],
    load=load,
    process=process,
    setup=setup,
    default_batch_size=64,
)
