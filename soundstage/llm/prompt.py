"""The prompt that asks an LLM which objects in a scene could be sounding.

The default template ships in the package (``soundstage/data/prompts/sources_v1.txt``); a user
may replace it with a file of their own. Templates are plain text with two placeholders:
``{captions}`` (required: the caption, or one line per frame) and ``{what}`` (optional: "one
video frame" / "N frames of one video clip"). Nothing else in the text is special, so JSON
examples with braces need no escaping.

The fingerprint of the ``sources`` stage holds ``template_identity``: the template's name and a
hash of its content, so editing either the shipped file or a user's file makes a new output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

#: the shipped template used when no file is given; bump the number when its meaning changes
DEFAULT_TEMPLATE = "sources_v1"


class PromptError(ValueError):
    """A template that cannot be used (missing file, no ``{captions}`` placeholder)."""


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, captions: list[str]) -> str:
        """The prompt for one frame's caption (a list of one) or a whole clip's captions."""
        if len(captions) == 1:
            what, block = "one video frame", captions[0].strip()
        else:
            what = f"{len(captions)} frames of one video clip, one line per frame, 1 second apart"
            block = "\n".join(f"Frame {i}: {c.strip()}" for i, c in enumerate(captions))
        return self.text.replace("{what}", what).replace("{captions}", block)

    def messages(self, captions: list[str]) -> list[dict]:
        """Chat messages for the prompt: a single user turn (some chat templates reject system turns)."""
        return [{"role": "user", "content": self.render(captions)}]


def load_template(prompt_file: str | None = None) -> Template:
    """The shipped default template, or the one in ``prompt_file``."""
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise PromptError(f"cannot read prompt file {prompt_file}: {e.strerror}") from None
        name = f"file:{prompt_file}"
    else:
        text = resources.files("soundstage").joinpath(f"data/prompts/{DEFAULT_TEMPLATE}.txt").read_text("utf-8")
        name = DEFAULT_TEMPLATE
    if "{captions}" not in text:
        raise PromptError(f"prompt template {name} has no {{captions}} placeholder")
    return Template(name, text)


def template_identity(prompt_file: str | None) -> str:
    """What the fingerprint records for ``--prompt-file``: content hash, not the path."""
    template = load_template(prompt_file)
    label = DEFAULT_TEMPLATE if not prompt_file else "file"
    return f"{label}:sha256:{template.sha256}"
