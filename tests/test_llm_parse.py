"""Reading object lists out of LLM answers: what real models return, and what must not parse."""

import json

import pytest

from soundstage.llm.parse import OK, UNPARSEABLE, Vocabulary, normalise_name, parse_answer, singular
from soundstage.llm.prompt import PromptError, load_template, template_identity

PARSED = [
    # strict format
    ('ANSWER: ["guitar", "man"]', ["guitar", "man"]),
    # reasoning first; a draft answer in the reasoning is overridden by the final one
    (
        'The caption shows a man with a dog. Draft ANSWER: ["tree"] is wrong, trees are silent.\nANSWER: ["man", "dog"]',
        ["man", "dog"],
    ),
    # code fence after the marker, bold marker
    ('Reasoning...\n**Answer:**\n```json\n["Violins", "piano"]\n```', ["violin", "piano"]),
    # a reply that is only a fenced list, no marker
    ('```json\n["dog"]\n```', ["dog"]),
    # plurals, articles, case, duplicates: singular lowercase, first occurrence order
    (
        'ANSWER: ["Guitars", "the men", "guitar", "a Dog", "PEOPLE", "buses", "boxes", "puppies"]',
        ["guitar", "man", "dog", "person", "bus", "box", "puppy"],
    ),
    # multi-word names keep their modifier, the head noun is singularised
    ('ANSWER: ["electric guitars", "fire trucks"]', ["electric guitar", "fire truck"]),
    # Python quotes and bare words
    ("ANSWER: ['cat', 'bird']", ["cat", "bird"]),
    ("answer: [drum, bass guitar]", ["drum", "bass guitar"]),
    # empty answers are valid: nothing is sounding
    ("ANSWER: []", []),
    ("Nothing here makes noise.\nANSWER: none", []),
    ('ANSWER: ["none"]', []),
    # reasoning without a marker, the list on the last line
    ('The dog barks.\n["dog"]', ["dog"]),
    # trailing chatter after the list
    ('ANSWER: ["horse"]. Hope this helps!', ["horse"]),
    # a list over several lines, a trailing comma
    ('ANSWER: [\n  "guitar",\n  "man"\n]', ["guitar", "man"]),
    ('ANSWER: ["guitar", "man",]', ["guitar", "man"]),
    # "answer:" mentioned in prose after the answer line
    ('ANSWER: ["dog"]\n(Note: my answer: is based on the caption.)', ["dog"]),
    # escaped quotes inside a name are JSON
    ('ANSWER: ["12\\" vinyl", "tuba"]', ['12" vinyl', "tuba"]),
]


@pytest.mark.parametrize("text,names", PARSED)
def test_parsed(text, names):
    result = parse_answer(text)
    assert result.status == OK, result.note
    assert result.names == names


def test_truncated_list_keeps_only_complete_names():
    result = parse_answer('Thinking...\nANSWER: ["guitar", "man", "dru')
    assert (result.status, result.names) == (OK, ["guitar", "man"])
    assert "cut off" in result.note
    bare = parse_answer("ANSWER: [guitar, man, dru")
    assert bare.names == ["guitar", "man"]


UNPARSEABLE_ANSWERS = [
    None,
    "",
    "   \n",
    "I think there is a guitar and a man.",  # names in prose: never guessed
    "ANSWER: guitar, man",  # not a list
    "ANSWER: [",  # cut before any name: not the same as "no sources"
    'ANSWER: ["gui',
    "ANSWER: [1, 2]",
    'ANSWER: [{"name": "dog"}]',
    'ANSWER: ["dog" and "cat"]',
    'ANSWER: [["dog"]]',
    "ANSWER: [dog; cat!!]",
    '<think>The dog... ANSWER: ["dog"]',  # cut inside the reasoning: the draft is not an answer
    'Draft ANSWER: ["dog"] then more thought.\nANSWER: [',  # the final answer was cut: not the draft
    "garbage tokens ] [ ,, ANSWER",
    'Some list ["dog"] in the middle of text, then more text.',
]


@pytest.mark.parametrize("text", UNPARSEABLE_ANSWERS)
def test_unparseable(text):
    result = parse_answer(text)
    assert result.status == UNPARSEABLE
    assert result.names is None


def test_think_section_then_answer():
    assert parse_answer('<think>maybe ["x"]</think>\nANSWER: ["dog"]').names == ["dog"]


@pytest.mark.parametrize(
    "word,single",
    [
        ("guitars", "guitar"),
        ("glasses", "glass"),
        ("bus", "bus"),
        ("watches", "watch"),
        ("wolves", "wolf"),
        ("firemen", "fireman"),
        ("women", "woman"),
        ("sheep", "sheep"),
        ("cellos", "cello"),
        ("cactus", "cactus"),
        ("harmonicas", "harmonica"),
        ("bass", "bass"),
        ("specimen", "specimen"),
        ("children", "child"),
        ("lens", "lens"),
    ],
)
def test_singular(word, single):
    assert singular(word) == single


def test_normalise_name():
    assert normalise_name("  The  Acoustic_Guitars. ") == "acoustic guitar"
    assert normalise_name("nothing") == ""


def test_vocabulary_mapping(tmp_path):
    label2idx = {"background": 1, "guitar": 2, "man": 3, "emergency-car": 4, "airplane": 5, "hair-dryer": 6}
    path = tmp_path / "label2idx.json"
    path.write_text(json.dumps(label2idx))
    vocab = Vocabulary.from_label2idx(str(path))
    assert vocab.match("guitar") == ("guitar", 1.0)
    assert vocab.match("hair dryer") == ("hair-dryer", 1.0)  # hyphenated class names
    assert vocab.match("ambulance") == ("emergency-car", 0.95)  # synonym
    assert vocab.match("electric guitar") == ("guitar", 0.9)  # head noun
    name, score = vocab.match("guitr")  # misspelling: string similarity
    assert name == "guitar" and score == pytest.approx(2 * 5 / 11, abs=1e-4)
    assert vocab.match("background")[0] != "background"  # never a mapping target
    mapped, scores = vocab.map_names(["guitar", "tree", "airplanes"], min_score=0.8)
    assert mapped == ["guitar", None, "airplane"]
    assert scores[0] == 1.0 and scores[1] < 0.8


def test_template_shipped_and_from_file(tmp_path):
    shipped = load_template()
    assert shipped.name == "sources_v1" and "ANSWER:" in shipped.text
    one = shipped.render(["a man plays a guitar"])
    assert "a man plays a guitar" in one and "{captions}" not in one and "one video frame" in one
    clip = shipped.render(["a dog", "a dog barks"])
    assert "Frame 0: a dog\nFrame 1: a dog barks" in clip
    custom = tmp_path / "p.txt"
    custom.write_text('Caption: {captions}\nANSWER: ["x"]')
    assert load_template(str(custom)).render(["c"]) == 'Caption: c\nANSWER: ["x"]'
    # the fingerprint follows the content, not the path
    moved = tmp_path / "moved.txt"
    moved.write_text(custom.read_text())
    assert template_identity(str(custom)) == template_identity(str(moved)) != template_identity(None)
    moved.write_text("Other {captions}")
    assert template_identity(str(moved)) != template_identity(str(custom))
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder")
    with pytest.raises(PromptError):
        load_template(str(bad))


def test_print_prompt_option(tmp_path):
    from click.testing import CliRunner

    from soundstage.pipeline.cli import stage_command
    from soundstage.stages import sources

    command = stage_command(sources.STAGE)
    if not any(p.name == "print_prompt" for p in command.params):  # until the CLI adds stage.cli_options
        command.params.extend(sources.STAGE.cli_options)
    shipped = CliRunner().invoke(command, ["--print-prompt"])
    assert shipped.exit_code == 0 and shipped.output == load_template().text
    custom = tmp_path / "mine.txt"
    custom.write_text("Describe: {captions}")
    assert CliRunner().invoke(command, ["--print-prompt", str(custom)]).output == "Describe: {captions}"
    bad = CliRunner().invoke(command, ["--print-prompt", str(tmp_path / "absent.txt")])
    assert bad.exit_code != 0 and "cannot read prompt file" in bad.output
