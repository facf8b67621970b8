"""sources: which objects in each frame could be sounding, inferred by an LLM from the captions.

For every frame the LLM sees that frame's caption; once more per clip it sees all captions
together (``clip_*`` fields). The prompt is the shipped template ``sources_v1`` or
``--prompt-file`` (its content hash is in the fingerprint; ``soundstage.llm.prompt``). The LLM
is a local transformers model (``--llm HUB_ID_OR_DIR``) or an OpenAI-compatible server
(``--llm-endpoint URL --llm SERVED_MODEL_NAME``); both decode greedily.

Every answer is stored as it came (``response``) beside what was read from it (``sources``, a
JSON list of singular lowercase names) and a ``status``:

- ``ok``: a list was found (possibly ``[]``: nothing sounds);
- ``unparseable``: the answer holds no list in the asked format (``sources`` is ``null``);
- ``error``: no answer at all (server down after all retries, empty caption); ``detail`` says why.

``attempts`` counts the requests each answer took (1 for a local model; 0 for an empty caption,
which is not asked about); retries are logged on the ``soundstage.llm`` logger. With
``--on-error fail`` (default) a clip with a question that got no answer after all retries fails
(recorded by the runner with the cause, nothing stored, exit status nonzero), so a rerun asks
again; with ``--on-error store`` it is stored with status ``error`` and the clip is done.
Unparseable answers are data (the LLM's deterministic reply) and are stored; the run summary
counts the clips that have any.
With ``--vocabulary label2idx.json`` each name is also mapped onto the dataset's classes
(``vocab_sources``, ``null`` below ``--vocab-min-score``) with its score (``vocab_scores``).
"""

import json
import logging

import click

from soundstage.device import device_param, dtype_param, resolve_device
from soundstage.llm.backends import Generation, HttpSettings, OpenAIChatEndpoint, TransformersChatLM, http_params
from soundstage.llm.parse import ERROR, OK, Vocabulary, parse_answer
from soundstage.llm.prompt import PromptError, load_template, template_identity
from soundstage.pipeline.identity import model_identity
from soundstage.pipeline.stage import ClipError, Field, Param, Stage, Upstream

log = logging.getLogger("soundstage.llm")

DEFAULT_LLM = "Qwen/Qwen2.5-7B-Instruct"
NULL = "null"  # JSON null: no list (unparseable/error), or no vocabulary mapping asked for


def load(row, ctx):
    try:
        captions = ctx.upstream["caption"][row["clip_id"]]["captions"]
    except KeyError:
        raise ClipError("no captions for this clip in the chosen caption output") from None
    return [str(c) for c in captions]


class SourcesModel:
    """The prompt template, the LLM backend and the optional vocabulary, set up once per run."""

    def __init__(self, params):
        self.template = load_template(params["prompt_file"] or None)
        if params["llm_endpoint"]:
            self.backend = OpenAIChatEndpoint(
                params["llm_endpoint"], params["llm"], params["max_new_tokens"], HttpSettings.from_params(params)
            )
        else:
            self.backend = TransformersChatLM(
                params["llm"],
                device=resolve_device(params["device"]),
                dtype=params["dtype"],
                max_new_tokens=params["max_new_tokens"],
                batch_size=params["llm_batch_size"],
            )
        self.vocabulary = Vocabulary.from_label2idx(params["vocabulary"]) if params["vocabulary"] else None
        self.min_score = params["vocab_min_score"]

    def record(self, generation: Generation) -> dict:
        """The stored fields of one answer (without the ``clip_`` prefix)."""
        out = {
            "response": generation.text or "",
            "attempts": generation.attempts,
            "status": ERROR,
            "sources": NULL,
            "detail": generation.error,
            "vocab_sources": NULL,
            "vocab_scores": NULL,
        }
        if generation.text is None:
            return out
        parsed = parse_answer(generation.text)
        out.update(status=parsed.status, detail=parsed.note)
        if parsed.status == OK:
            out["sources"] = json.dumps(parsed.names)
            if self.vocabulary is not None:
                mapped, scores = self.vocabulary.map_names(parsed.names, self.min_score)
                out.update(vocab_sources=json.dumps(mapped), vocab_scores=json.dumps(scores))
        return out


ANSWER_FIELDS = ("response", "sources", "status", "attempts", "detail", "vocab_sources", "vocab_scores")


def process(model: SourcesModel, items, params):
    # one request list for the whole batch: the backend batches / runs it concurrently
    conversations, slots = [], []
    for k, captions in enumerate(items):
        for i, caption in enumerate(captions):
            if caption.strip():
                conversations.append(model.template.messages([caption]))
                slots.append((k, i))
        if any(c.strip() for c in captions):
            conversations.append(model.template.messages(captions))
            slots.append((k, "clip"))
    answers = dict(zip(slots, model.backend.generate(conversations)))
    _log_retries(answers.values())

    no_caption = Generation(None, 0, "empty caption: nothing to ask about")
    results = []
    for k, captions in enumerate(items):
        frames = [model.record(answers.get((k, i), no_caption)) for i in range(len(captions))]
        clip = model.record(answers.get((k, "clip"), no_caption))
        result = {name: [f[name] for f in frames] for name in ANSWER_FIELDS}
        result.update({f"clip_{name}": clip[name] for name in ANSWER_FIELDS})
        if params["on_error"] == "fail":
            _fail_on_unanswered(result, len(captions))
        results.append(result)
    return results


def _fail_on_unanswered(result: dict, frames: int) -> None:
    """ClipError for the first question asked but not answered (an empty caption is no such case:
    asking again would not change it)."""
    rows = zip(
        result["status"] + [result["clip_status"]],
        result["attempts"] + [result["clip_attempts"]],
        result["detail"] + [result["clip_detail"]],
    )
    for i, (status, attempts, detail) in enumerate(rows):
        if status == ERROR and attempts > 0:
            where = f"frame {i}" if i < frames else "the clip-level question"
            raise ClipError(f"no LLM answer for {where}: {detail}")


def _log_retries(answers) -> None:
    retried = [a for a in answers if a.attempts > 1]
    failed = [a for a in answers if a.text is None]
    if retried or failed:
        log.warning(
            "sources: %d of %d LLM requests needed retries (%d extra attempts); %d failed",
            len(retried),
            len(answers),
            sum(a.attempts - 1 for a in retried),
            len(failed),
        )


def _print_prompt(ctx, _param, value):
    if value is None:
        return
    try:
        click.echo(load_template(value or None).text, nl=False)
    except PromptError as e:
        raise click.BadParameter(str(e)) from None
    ctx.exit(0)


#: ``--print-prompt [FILE]``: show the shipped template (or FILE's, as ``--prompt-file FILE`` would
#: use it) and exit. An extra option of the generated ``soundstage sources`` command.
PRINT_PROMPT = click.Option(
    ["--print-prompt"],
    is_flag=False,
    flag_value="",
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_print_prompt,
    metavar="[FILE]",
    help="print the prompt template (the shipped one, or FILE as --prompt-file FILE would use it) and exit",
)


def _not_ok_note(values: dict) -> str | None:
    """For the run summary: how many of a clip's answers are not usable lists."""
    statuses = list(values["status"]) + [values["clip_status"]]
    bad = {s: statuses.count(s) for s in set(statuses) if s != OK}
    return ", ".join(f"{n} answer(s) {s}" for s, n in sorted(bad.items())) or None


def _backend_identity(endpoint: str) -> str:
    """In the key: that an endpoint served the answers (another engine than local transformers);
    not its URL, so moving the server keeps the key."""
    return "openai-compatible endpoint" if endpoint else "local transformers"


def _answer_fields(prefix: str, shape: tuple, what: str) -> list:
    return [
        Field(prefix + "response", "str", shape, f"raw LLM answer ({what})"),
        Field(prefix + "sources", "str", shape, "parsed names, a JSON list; null unless status is ok"),
        Field(prefix + "status", "str", shape, "ok | unparseable | error"),
        Field(prefix + "attempts", "int32", shape, "requests the answer took (retries + 1)"),
        Field(prefix + "detail", "str", shape, "why not ok, or a parse note (e.g. list cut off)"),
        Field(prefix + "vocab_sources", "str", shape, "sources mapped onto --vocabulary (JSON, null entries below the score)"),
        Field(prefix + "vocab_scores", "str", shape, "mapping score of each name in [0, 1] (JSON list)"),
    ]


STAGE = Stage(
    name="sources",
    reads=(),  # no manifest column: its inputs are the upstream clips
    version=1,
    help="Objects that may be sounding in each frame (and the clip), inferred by an LLM from the captions.",
    upstream=[Upstream("caption", "caption")],
    params=[
        Param(
            "llm",
            str,
            DEFAULT_LLM,
            "chat LLM: hub id or local directory, or the model name served at --llm-endpoint",
            identity=model_identity,
        ),
        Param(
            "llm_endpoint",
            str,
            "",
            "URL of an OpenAI-compatible server (e.g. vLLM; bearer token from $SOUNDSTAGE_LLM_API_KEY); empty: run --llm locally",
            identity=_backend_identity,
            omit_default=True,
        ),
        Param(
            "prompt_file",
            str,
            "",
            "prompt template file with {captions} (default: the shipped sources_v1)",
            identity=template_identity,
        ),
        Param("max_new_tokens", int, 512, "longest answer in tokens (reasoning included)"),
        Param(
            "vocabulary",
            str,
            "",
            "label2idx.json whose class names the sources are mapped onto (optional)",
            identity=model_identity,
        ),
        Param("vocab_min_score", float, 0.8, "a mapping scoring below this is stored as null"),
        dtype_param("bf16", "local LLM weights dtype"),
        device_param("local LLM device (auto: cuda when available)"),
        Param("llm_batch_size", int, 16, "prompts per generate call of a local LLM", fingerprint=False),
        *http_params(),
        Param(
            "on_error",
            str,
            "fail",
            "an answer that could not be obtained: fail the clip so a rerun asks again, or store it as status error",
            choices=("fail", "store"),
            omit_default=True,
        ),
    ],
    fields=_answer_fields("", (None,), "per frame") + _answer_fields("clip_", (), "all captions of the clip"),
    load=load,
    process=process,
    setup=SourcesModel,
    default_batch_size=8,
    warn=_not_ok_note,
    cli_options=[PRINT_PROMPT],
)
