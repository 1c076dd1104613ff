"""Chat templates (llama2_cython/chat.py): rendering and ids against transformers'
apply_chat_template on the real templates in ../shared/fixtures/hf_tokenizers, the conversation's
KV cache and stops on a scripted model, and `-m chat` / Model.chat on tiny random models with
SmolLM's tokenizer (run and runq): the ids fed for a two-turn chat are transformers' ids."""
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from llama2_cython import LlamaError, bpe, chat, export
from llama2_cython.hf_tokenizer import HFTokenizer
import run
import runq
from tests.helpers import REPO, SHARED, TESTDATA, assert_one_line_error, run_cli

transformers = pytest.importorskip("transformers")
from transformers.utils import chat_template_utils  # noqa: E402

HF = SHARED / "hf_tokenizers"
SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello world"}],
    "system": [SYSTEM, {"role": "user", "content": "Hello world"}],
    "turns": [SYSTEM, {"role": "user", "content": "Hello world"},
              {"role": "assistant", "content": "Hi! How can I help?"},
              {"role": "user", "content": "Tell me a joke."}],
    "unicode": [{"role": "user",
                 "content": "Ünïcödé — 日本語 😀 \"quotes\" <b>tags</b> & ' \\"},
                {"role": "assistant", "content": "ça va ✓\n"},
                {"role": "user", "content": "  spaces  \n\nnewlines \t"}],
    "long": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"},
             {"role": "user", "content": "Thanks"}],
}
FIXED_NOW = datetime.datetime(2024, 7, 26, 12, 0, 0)


class FixedDay(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """strftime_now() gives the same day in both renderers (Llama 3.2's "Today Date")."""
    monkeypatch.setattr(chat_template_utils, "datetime", FixedDay)
    monkeypatch.setattr(chat, "datetime", types.SimpleNamespace(datetime=FixedDay))


def shared(*parts):
    path = HF.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} comes from ../shared/fixtures, which is absent")
    return path


def hf_folder(folder, config, template_file=None, tokenizer_json=None):
    """A tokenizer folder: SmolLM's tokenizer.json (or tokenizer_json), config as its
    tokenizer_config.json, and template_file's text as chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json or shared("smollm", "tokenizer.json"), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


def smollm_config(**changes):
    config = json.loads(shared("smollm", "tokenizer_config.json").read_text())
    config.update(changes)
    return config


def reference(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def llama3_folders(tmp_path_factory):
    """{name: (folder, transformers tokenizer, our tiktoken tokenizer)} for Llama 3.2 and 3.0
    Instruct: transformers' conversion of tokenizer.model (how HF's tokenizer.json was made)
    beside the fixture's tokenizer_config.json."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter
    model = shared("llama3", "tokenizer.model")
    out = {}
    for name in ("Llama-3.2-1B-Instruct", "Meta-Llama-3-8B-Instruct"):
        config = shared("llama3", name)
        ours = bpe.load(model, config=config)
        specials = [ours.piece(i).decode() for i in range(128000, 128256)]
        folder = tmp_path_factory.mktemp(name)
        converter(vocab_file=str(model), extra_special_tokens=specials).converted() \
            .save(str(folder / "tokenizer.json"))
        shutil.copy(config / "tokenizer_config.json", folder)
        out[name] = (folder, reference(folder), ours)
    return out


def same_as_transformers(folder, ref, ours_tokenizer=None, conversations=CONVERSATIONS.values()):
    """Our rendering of each conversation (with and without the generation prompt) is
    transformers' text, and (given a tokenizer) our ids are its ids."""
    template = chat.ChatTemplate.find(folder)
    for messages in conversations:
        for add in (True, False):
            text = template.render(messages, add_generation_prompt=add)
            assert text == ref.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add)
            if ours_tokenizer is not None:
                ids = ref.apply_chat_template(messages, add_generation_prompt=add,
                                              return_dict=False)
                assert ours_tokenizer.encode(text, add_special_tokens=False) == ids
    return template


# ---------------------------------------------------------------------------- rendering

def test_smollm_renders_and_tokenizes_as_transformers():
    folder = shared("smollm")
    ours = bpe.load(folder)
    same_as_transformers(folder, reference(folder), ours)
    form = chat.TemplateFormat.of(HFTokenizer(ours, ours.vocab_size))
    assert form.stop_ids == {2}  # <|im_end|>
    prompt = form.prompt(CONVERSATIONS["user"])
    assert prompt.ids == [1, 4093, 198, 19556, 905, 2, 198, 1, 520, 9531, 198]
    assert prompt.text == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"


def test_tinyllama_template_from_its_jinja_file(tmp_path):
    """transformers >= 4.56 saves the template as chat_template.jinja: the config has none."""
    config = json.loads(shared("tinyllama", "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    folder = hf_folder(tmp_path / "tinyllama", config, shared("tinyllama",
                                                            "chat_template.jinja").read_text())
    template = same_as_transformers(folder, reference(folder))
    assert template.source == str(folder / "chat_template.jinja")
    assert template.render(CONVERSATIONS["system"]) == \
        "<|system|>\nYou are terse.</s>\n<|user|>\nHello world</s>\n<|assistant|>\n"


def test_tinyllama_sentencepiece_style_as_transformers(tmp_path):
    """TinyLlama's folder with a sentencepiece-style tokenizer.json (Llama 2's vocabulary, laid
    out as transformers converts it: tests/test_bpe_spm.py): transformers' ids; the reply prints
    as its decode(), whose decoder drops the text's first space."""
    from tests.test_bpe_spm import make_spm_json
    tokenizer_bin = SHARED / "tokenizer.bin"
    if not tokenizer_bin.exists():
        pytest.skip("tokenizer.bin comes from ../shared/fixtures, which is absent")
    make_spm_json(tmp_path / "tokenizer.json", tokenizer_bin, "first")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(shared("tinyllama", name), tmp_path)
    ref = reference(tmp_path)
    tokenizer = HFTokenizer(bpe.load(tmp_path), 32000)
    same_as_transformers(tmp_path, ref, tokenizer.tokenizer)
    form = chat.TemplateFormat.of(tokenizer)
    assert form.stop_ids == {2}  # </s>
    reply = [15043, 3186, 29991]  # "▁Hello", "▁world", "!"
    piece = form.printer()
    assert b"".join(piece(token) for token in reply) == b"Hello world!"
    assert form.reply_text(reply) == ref.decode(reply) == "Hello world!"


@pytest.mark.parametrize("name", ["Llama-3.2-1B-Instruct", "Meta-Llama-3-8B-Instruct"])
def test_llama3_renders_and_tokenizes_as_transformers(llama3_folders, name):
    folder, ref, ours = llama3_folders[name]
    same_as_transformers(folder, ref, ours)
    form = chat.TemplateFormat(HFTokenizer(ours, 128256), chat.ChatTemplate.find(folder))
    assert 128009 in form.stop_ids  # <|eot_id|>


def test_llama32_prompt_of_the_fixture_readme(llama3_folders):
    """The rendering and ids ../shared/fixtures/hf_tokenizers/README.md records (no
    strftime_now there: the template's own fallback date, which date_string also gives)."""
    folder, ref, ours = llama3_folders["Llama-3.2-1B-Instruct"]
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                "Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHello world<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    template = chat.ChatTemplate.find(folder)
    assert template.render(CONVERSATIONS["system"]) == expected  # strftime_now: FIXED_NOW
    assert template.render(CONVERSATIONS["system"], date_string="26 Jul 2024") == expected
    ids = chat.TemplateFormat(HFTokenizer(ours, 128256), template) \
        .prompt(CONVERSATIONS["system"]).ids
    assert len(ids) == 41
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]
    assert ids[-8:] == [271, 9906, 1917, 128009, 128006, 78191, 128007, 271]
    # and today's date when the day is another one, as transformers gives it
    other = datetime.datetime(2031, 1, 2)
    FixedDay.now = classmethod(lambda cls, tz=None: other)
    try:
        text = template.render(CONVERSATIONS["system"])
        assert "Today Date: 02 Jan 2031" in text
        assert text == ref.apply_chat_template(CONVERSATIONS["system"], tokenize=False,
                                               add_generation_prompt=True)
    finally:
        FixedDay.now = classmethod(lambda cls, tz=None: FIXED_NOW)


TEMPLATES = {
    # special tokens as variables: the standard ones, a model's own "*_token" key, an AddedToken
    # object, a named extra special token
    "variables": ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|"
                  "{{ image_token }}|{{ tool_token }}|{{ named_token }}|"
                  "{{ sep_token is defined }}|{{ tools }}|{{ documents }}|"
                  "{{ add_generation_prompt }}{% for m in messages %}{{ m.content }}{% endfor %}"),
    # the environment: trim_blocks/lstrip_blocks, loop controls, tojson, dict(), namespace(),
    # the generation block, whitespace control
    "environment": ("{% set ns = namespace(n=0) %}\n"
                    "  {% for m in messages %}\n"
                    "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
                    "    {% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                    "{% endgeneration %}{% continue %}{% endif %}\n"
                    "    {% set ns.n = ns.n + 1 %}\n"
                    "{{ m | tojson }} {{ dict(a=1, b=m.role) | tojson(indent=2) }}\n"
                    "  {%- endfor %}\n"
                    "{{ ns.n }} {{ messages | map(attribute='content') | join('/') | upper }}\n"
                    "{{- '|' + (messages[0].content | trim) -}}   \n  end"),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_environment_and_variables_as_transformers(tmp_path, name):
    config = smollm_config(chat_template=TEMPLATES[name], image_token="<|im_start|>",
                           tool_token={"__type": "AddedToken", "content": "<tool>",
                                       "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False, "special": True},
                           extra_special_tokens={"named_token": "<named>"})
    folder = hf_folder(tmp_path / name, config)
    template = same_as_transformers(folder, reference(folder))
    if name == "variables":
        assert template.render(CONVERSATIONS["user"]) == \
            "<|im_start|>|<|im_end|>|<|im_end|>|<|endoftext|>|<|im_start|>|<tool>|<named>|" \
            "False|None|None|TrueHello world"


def test_message_values_as_transformers_passes_them(tmp_path):
    """None values are dropped, reasoning is passed under the names templates read."""
    source = ("{% for m in messages %}{{ m.role }}:{{ m.content is defined }}:"
              "{{ m.reasoning_content }}:{{ m.thinking }}:{{ (m.extra or 0) | tojson }};"
              "{% endfor %}")
    folder = hf_folder(tmp_path / "values", smollm_config(chat_template=source))
    messages = [[{"role": "user", "content": None, "extra": {"k": [1, 2.5, True, None]}},
                 {"role": "assistant", "content": "a", "reasoning": "because"}]]
    same_as_transformers(folder, reference(folder), conversations=messages)


def test_named_templates_and_template_files(tmp_path):
    """A config's list of named templates: "default" is used; chat_template.jinja and
    additional_chat_templates/*.jinja take the place of the config's templates."""
    named = [{"name": "tool_use", "template": "TOOLS"},
             {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}]
    folder = hf_folder(tmp_path / "named", smollm_config(chat_template=named))
    same_as_transformers(folder, reference(folder))
    assert chat.ChatTemplate.find(folder).render(CONVERSATIONS["user"]) == "DEFAULT Hello world"

    folder = hf_folder(tmp_path / "files", smollm_config(chat_template=named),
                       "FILE\r\n{{ eos_token }}\r.\n")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("MORE")
    same_as_transformers(folder, reference(folder))
    assert chat.ChatTemplate.find(folder).render(CONVERSATIONS["user"]) == "FILE\n<|im_end|>\n."

    folder = hf_folder(tmp_path / "nodefault", smollm_config(chat_template=named[:1]))
    with pytest.raises(ValueError, match="no default"):
        reference(folder).apply_chat_template(CONVERSATIONS["user"], tokenize=False)
    with pytest.raises(LlamaError, match="chat templates named tool_use and none named"):
        chat.ChatTemplate.find(folder)


def test_no_template(tmp_path):
    folder = hf_folder(tmp_path / "none", {"eos_token": "<|im_end|>"})
    assert chat.ChatTemplate.find(folder) is None
    with pytest.raises(LlamaError, match="no chat template"):
        chat.TemplateFormat.of(HFTokenizer(bpe.load(folder), 49152))


@pytest.mark.parametrize("source, ours, theirs", [
    ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}ok", "refuses the conversation: System role not supported",
     "System role not supported"),
    ("{% set ns = namespace(_x=1) %}", "failed: SecurityError: .*underscore", "underscore"),
    ("{{ messages.__class__ }}", "", None),  # the sandbox: an unsafe attribute is undefined
    ("{{ messages[0].content.upper.__globals__ }}", "", None),
    ("{{ 1 + 'a' }}", "failed: TypeError", "unsupported operand"),
    ("{{ nothing.at_all }}", "failed: UndefinedError: 'nothing' is undefined", "undefined"),
    ("{% for m in messages %}{{ m.content }", "line 1: unexpected '}'", "unexpected"),
])
def test_template_errors_are_one_line(tmp_path, source, ours, theirs):
    folder = hf_folder(tmp_path / "bad", smollm_config(chat_template=source))
    template = chat.ChatTemplate.find(folder)
    if theirs is None:
        assert template.render(CONVERSATIONS["system"]) == \
            reference(folder).apply_chat_template(CONVERSATIONS["system"], tokenize=False)
        return
    with pytest.raises(Exception, match=theirs):
        reference(folder).apply_chat_template(CONVERSATIONS["system"], tokenize=False)
    with pytest.raises(LlamaError, match=ours) as error:
        template.render(CONVERSATIONS["system"])
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


def test_bad_messages_and_config(tmp_path):
    template = chat.ChatTemplate("{{ messages }}", "t.jinja", {})
    with pytest.raises(ValueError, match="no messages"):
        template.render([])
    with pytest.raises(TypeError, match="messages must be a list"):
        template.render("hello")
    with pytest.raises(TypeError, match=r"messages\[0\] is a str"):
        template.render(["hello"])
    with pytest.raises(TypeError, match=r"messages\[0\]\['content'\] is a bytes"):
        template.render([{"role": "user", "content": b"hi"}])
    folder = hf_folder(tmp_path / "badlist", smollm_config(chat_template=[["default", "x"]]))
    with pytest.raises(LlamaError, match=r"chat_template\[0\] is not an object"):
        chat.ChatTemplate.find(folder)
    for value, message in ((5, "eos_token is a number"), (["x"], "eos_token is a list"),
                           ({"x": 1}, 'eos_token has no "content"')):
        folder = hf_folder(tmp_path / f"eos{len(message)}", smollm_config(eos_token=value))
        with pytest.raises(LlamaError, match=message):
            chat.ChatTemplate.find(folder)
    with pytest.raises(LlamaError, match="eos_token 'two words' is not one token of .* but 2"):
        chat.TemplateFormat(HFTokenizer(bpe.load(shared("smollm")), 49152),
                            chat.ChatTemplate("x", "t.jinja", {"eos_token": "two words"}))


# ---------------------------------------------------------------------------- the conversation

class ScriptedModel:
    """A transformer whose logits pick the next token from a script (a greedy sampler then
    follows it), recording what the KV cache holds at each position."""

    def __init__(self, vocab_size, script):
        self.vocab_size = vocab_size
        self.script = list(script)
        self.cache = {}
        self.feeds = []  # (first position, tokens) of each call

    def _logits(self):
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        logits[self.script.pop(0) if self.script else 0] = 1.0
        return logits

    def forward(self, token, pos):
        assert all(p in self.cache for p in range(pos)), "a hole in the KV cache"
        self.cache[pos] = token
        self.feeds.append((pos, [token]))
        return self._logits()

    def forward_prompt(self, tokens, pos):
        assert all(p in self.cache for p in range(pos)), "a hole in the KV cache"
        self.cache.update(zip(range(pos, pos + len(tokens)), tokens))
        self.feeds.append((pos, list(tokens)))
        return self._logits()


@pytest.fixture(scope="module")
def smollm():
    """SmolLM's tokenizer as the engines hold it."""
    return HFTokenizer(bpe.load(shared("smollm")), 49152)


def test_conversation_keeps_the_shared_prefix_and_stops(smollm):
    form = chat.TemplateFormat.of(smollm)
    hi, there, im_end = 6057, 665, 2
    model = ScriptedModel(smollm.vocab_size, [hi, there, im_end, 0, im_end, 0])
    conversation = chat.Conversation(model, form, run.Sampler(smollm.vocab_size, 0.0, 0.9, 1), 256)
    messages = [SYSTEM, {"role": "user", "content": "Hello world"}]
    first = form.prompt(messages).ids
    assert list(conversation.respond(messages)) == [hi, there]
    assert conversation.turn_ended and not conversation.full
    # the prompt at 0, each reply token after it, and the end of the turn fed as run.c feeds EOS
    assert model.feeds == [(0, first), (len(first), [hi]), (len(first) + 1, [there]),
                           (len(first) + 2, [im_end])]
    assert conversation.tokens == first + [hi, there, im_end]

    messages += [{"role": "assistant", "content": form.reply_text([hi, there])},
                 {"role": "user", "content": "Again"}]
    second = form.prompt(messages).ids
    assert second[:len(conversation.tokens)] == conversation.tokens  # ChatML re-renders the same
    assert list(conversation.respond(messages)) == []  # the script's <|im_end|> at once
    kept = len(first) + 3
    assert model.feeds[4] == (kept, second[kept:])  # only what the cache lacks
    assert [model.cache[p] for p in range(len(second))] == second
    assert conversation.tokens == second + [im_end]

    # a different history: the cache is rewound to the common prefix and overwritten from there
    messages[2]["content"] = "Changed"
    third = form.prompt(messages).ids
    common = next(i for i, (a, b) in enumerate(zip(third, conversation.tokens)) if a != b)
    list(conversation.respond(messages))
    assert model.feeds[6] == (common, third[common:])
    assert [model.cache[p] for p in range(len(third))] == third


def test_one_turn_at_a_time(smollm):
    """A second turn while the first's reply is being read would rewind the cache under it: it is
    refused, the first goes on as if alone, and once it is closed the next turn runs."""
    form = chat.TemplateFormat.of(smollm)
    hi, there, im_end = 6057, 665, 2
    model = ScriptedModel(smollm.vocab_size, [hi, there, im_end, 0, there, im_end])
    conversation = chat.Conversation(model, form, run.Sampler(smollm.vocab_size, 0.0, 0.9, 1), 256)
    messages = [{"role": "user", "content": "Hello world"}]
    first = conversation.respond(messages)
    assert next(first) == hi
    other = [{"role": "user", "content": "Something else"}]
    with pytest.raises(LlamaError, match="still answering"):
        next(conversation.respond(other))
    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(LlamaError, list, conversation.respond(other))))
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert list(first) == [there]
    prompt = form.prompt(messages).ids
    assert conversation.tokens == prompt + [hi, there, im_end]
    assert [model.cache[p] for p in range(len(conversation.tokens))] == conversation.tokens
    # a reply left unfinished: closed, the next turn runs
    second = conversation.respond(other)
    assert next(second) == there
    second.close()
    assert list(conversation.respond(other)) == []  # the script's <|im_end|>


def test_an_interrupted_feed_leaves_no_stale_tokens(smollm):
    """A turn's feed cut short (Ctrl-C in forward_prompt) has overwritten the cache from the common
    prefix on: the conversation must not keep its old tokens there for the next turn."""
    form = chat.TemplateFormat.of(smollm)
    model = ScriptedModel(smollm.vocab_size, [6057, 2, 2])
    conversation = chat.Conversation(model, form, run.Sampler(smollm.vocab_size, 0.0, 0.9, 1), 256)
    messages = [{"role": "user", "content": "Hello world"}]
    list(conversation.respond(messages))
    messages[0]["content"] = "Hello there"
    common = next(i for i, (a, b) in enumerate(zip(form.prompt(messages).ids, conversation.tokens))
                  if a != b)

    def interrupted(tokens, pos):
        model.cache.update(zip(range(pos, pos + len(tokens)), tokens))  # written, then the signal
        raise KeyboardInterrupt
    model.forward_prompt = interrupted
    with pytest.raises(KeyboardInterrupt):
        list(conversation.respond(messages))
    assert conversation.tokens == form.prompt(messages).ids[:common]


@pytest.mark.parametrize("steps, replies, ended, full", [
    (10, [], False, True),  # the prompt (11 tokens) does not fit
    (11, [6057], False, True),  # the prompt fills the steps: one token is sampled, none fed
    (13, [6057, 665, 6057], False, True),  # steps run out within the reply
    (14, [6057, 665, 6057], True, True),  # the turn ends; no position is left for its end
    (15, [6057, 665, 6057], True, True),  # the end of the turn takes the last position
    (16, [6057, 665, 6057], True, False),
])
def test_conversation_steps(smollm, steps, replies, ended, full):
    form = chat.TemplateFormat.of(smollm)
    model = ScriptedModel(smollm.vocab_size, [6057, 665, 6057, 2])
    conversation = chat.Conversation(model, form, run.Sampler(smollm.vocab_size, 0.0, 0.9, 1),
                                     steps)
    assert list(conversation.respond(CONVERSATIONS["user"])) == replies
    assert (conversation.turn_ended, conversation.full) == (ended, full)
    assert len(conversation.tokens) <= steps and max(model.cache, default=-1) < steps


# ---------------------------------------------------------------------------- on the engines

ENGINES = {"run": run, "runq": runq}
TINY = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152,
            seq_len=128)
SEED = 6  # turn 1 and turn 2 both end after a few tokens on both files (tests check it)
TWO_TURNS = [SYSTEM, {"role": "user", "content": "Hi there"}, None,
             {"role": "user", "content": "Ünïcödé 😀?"}]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Random models with SmolLM's vocabulary that end their replies: every embedding's first
    component is large (it survives the layers), and only <|im_end|>'s classifier row reads it,
    so that each step samples <|im_end|> with a probability of about 0.15."""
    weights = export.random_model(TINY, seed=1, shared=False)
    weights["token_embedding_table"][:, 0] = 200.0
    weights["wcls"][2] = 0.0
    weights["wcls"][2, 0] = 6.5
    folder = tmp_path_factory.mktemp("chat_models")
    export.write_v1(folder / "tiny.bin", TINY, weights, False)
    export.write_v2(folder / "tiny_q80.bin", TINY, weights, False, group_size=32)
    return {"run": folder / "tiny.bin", "runq": folder / "tiny_q80.bin"}


class Recorder:
    """An engine's transformer, with the token each position of its KV cache last got."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.cache = {}

    def forward(self, token, pos):
        self.cache[pos] = token
        return self.transformer.forward(token, pos)

    def forward_prompt(self, tokens, pos):
        self.cache.update(zip(range(pos, pos + len(tokens)), tokens))
        return self.transformer.forward_prompt(tokens, pos)

    def holds(self, n):
        return [self.cache[p] for p in range(n)]


@pytest.mark.parametrize("module", ["run", "runq"])
def test_two_turn_chat_feeds_transformers_ids(module, tiny_models, smollm):
    """In the engine, the KV cache holds transformers' ids for the conversation at each turn;
    `-m chat` prints that conversation's replies and Model.chat gives the first one."""
    engine = ENGINES[module]
    ref = reference(shared("smollm"))
    form = chat.TemplateFormat.of(smollm)
    model = Recorder(engine.Transformer(str(tiny_models[module])))
    conversation = chat.Conversation(model, form, engine.Sampler(TINY["vocab_size"], 1.0, 0.9,
                                                                 SEED), 128)
    messages = TWO_TURNS[:2]
    first = list(conversation.respond(messages))
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert model.holds(len(expected)) == expected
    assert first and conversation.turn_ended  # a real two-turn chat
    messages = messages + [{"role": "assistant", "content": smollm.decode(first)}, TWO_TURNS[3]]
    second = list(conversation.respond(messages))
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert model.holds(len(expected)) == expected
    assert second and conversation.turn_ended
    assert conversation.tokens == expected + second + [2]

    proc = run_cli(module, [tiny_models[module], "-z", shared("smollm"), "-m", "chat",
                            "-y", SYSTEM["content"], "-i", "Hi there", "-s", SEED, "-t", "1",
                            "-p", "0.9", "-n", "128"], stdin=TWO_TURNS[3]["content"].encode())
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    pieces = [b"".join(smollm.piece(t) for t in reply) for reply in (first, second)]
    assert proc.stdout == b"Assistant: " + pieces[0] + b"\nUser: Assistant: " + pieces[1] + \
        b"\nUser: \n"

    api = engine.Model(str(tiny_models[module]), str(shared("smollm")))
    assert api.chat_prompt(messages).ids == expected
    assert api.chat_prompt(messages).text == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert "".join(api.chat(TWO_TURNS[:2], steps=128, temperature=1.0, topp=0.9, seed=SEED)) == \
        smollm.decode(first)
    reply = smollm.decode(first)
    assert "".join(api.chat(TWO_TURNS[:2], steps=128, seed=SEED, stop=reply[1:3])) == reply[:1]


@pytest.mark.parametrize("module", ["run", "runq"])
def test_chat_ends_when_steps_run_out(module, tiny_models, smollm):
    """Within the reply: the last token sampled is printed (as run.c does), then one newline;
    no more turns are asked for."""
    prompt = chat.TemplateFormat.of(smollm).prompt(TWO_TURNS[:2]).ids
    args = [tiny_models[module], "-z", shared("smollm"), "-m", "chat", "-y", SYSTEM["content"],
            "-s", SEED, "-t", "1", "-p", "0.9"]
    proc = run_cli(module, args + ["-n", len(prompt) + 2], stdin=b"Hi there\nmore\n")
    assert proc.returncode == 0 and proc.stderr == b""
    reply = proc.stdout.removeprefix(b"User: Assistant: ").removesuffix(b"\n")
    assert b"\n" not in reply and proc.stdout.endswith(reply + b"\n")
    full = run_cli(module, args + ["-n", 128], stdin=b"Hi there\n").stdout
    assert full.startswith(b"User: Assistant: " + reply)
    # the prompt alone does not fit: "Assistant: " and the end, as run.c; the API refuses it
    proc = run_cli(module, args + ["-n", len(prompt) - 1], stdin=b"Hi there\nmore\n")
    assert proc.stdout == b"User: Assistant: \n"
    api = ENGINES[module].Model(str(tiny_models[module]), str(shared("smollm")))
    with pytest.raises(LlamaError, match=f"the chat prompt is {len(prompt)} tokens, more than steps="):
        list(api.chat(TWO_TURNS[:2], steps=len(prompt) - 1))
    "".join(api.chat(TWO_TURNS[:2], steps=len(prompt), seed=SEED))  # it fits: no error


def test_run_cuda_chats_as_run(tiny_models):
    """run_cuda (on cuda_emulator: the same host code as on a GPU) feeds a turn's tokens one at a
    time, and prints what run prints."""
    args = [tiny_models["run"], "-z", shared("smollm"), "-m", "chat", "-y", SYSTEM["content"],
            "-s", SEED, "-t", "1", "-p", "0.9", "-n", "40"]
    stdin = b"Hi there\nmore\n"
    expected = run_cli("run", args, stdin=stdin)
    # two turns where the first reply ends within -n (the seed's on this machine; a CPU whose
    # fast-math sums differ may draw a longer one: then one turn is compared)
    assert expected.returncode == 0 and expected.stdout.count(b"Assistant: ") >= 1
    proc = subprocess.run([sys.executable, "run_cuda.py", *map(str, args)], input=stdin, cwd=REPO,
                          capture_output=True, timeout=300,
                          env={**os.environ, "RUN_CUDA_EMULATOR": "1"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == expected.stdout


def test_chat_refusals_are_one_line(tmp_path, tiny_models):
    model = tiny_models["run"]
    refuses = hf_folder(tmp_path / "refuses", smollm_config(chat_template=(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")))
    err = assert_one_line_error(run_cli("run", [model, "-z", refuses, "-m", "chat", "-y", "Be.",
                                                "-i", "Hi"]))
    assert "the chat template refuses the conversation: System role not supported" in err
    broken = hf_folder(tmp_path / "broken", smollm_config(chat_template="{% if %}"))
    err = assert_one_line_error(run_cli("runq", [tiny_models["runq"], "-z", broken, "-m", "chat",
                                                 "-y", "", "-i", "Hi"]))
    assert "chat template line 1" in err
    none = hf_folder(tmp_path / "none", {"eos_token": "<|im_end|>"})
    err = assert_one_line_error(run_cli("run", [model, "-z", none, "-m", "chat", "-y", "",
                                                "-i", "Hi"]))
    assert "no chat template" in err
    err = assert_one_line_error(run_cli("run", [model, "-z", shared("smollm"), "-m", "chat",
                                                "-y", ""], stdin=b"bad \xff byte\n"))
    assert "user prompt is not UTF-8" in err
    fake = tmp_path / "fake" / "jinja2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no jinja2 here')\n")
    err = assert_one_line_error(run_cli("run", [model, "-z", shared("smollm"), "-m", "chat",
                                                "-y", "", "-i", "Hi"],
                                        env={**os.environ, "PYTHONPATH": str(fake.parent)}))
    assert "chat templates need jinja2" in err


@pytest.mark.parametrize("module", ["run", "runq"])
def test_llama2_format_is_what_run_c_chat_feeds(module):
    """With run.c's tokenizer .bin: the API feeds what run.c's chat loop feeds, and its greedy
    reply is the one `-m chat` prints (there after the space the first piece starts with)."""
    engine = ENGINES[module]
    model_path = {"run": TESTDATA / "tiny_mha.bin", "runq": TESTDATA / "tiny_mha_q80.bin"}[module]
    tok = TESTDATA / "tok512.bin"
    model = engine.Model(str(model_path), str(tok))
    system, user = "Be kind.", "Once upon a time"
    first = model.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]")
    turns = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    assert model.chat_prompt(turns).ids == first
    assert model.chat_prompt(turns[1:]).ids == model.encode(f"[INST] {user} [/INST]")
    later = turns + [{"role": "assistant", "content": "a cat"}, {"role": "user", "content": "more"}]
    assert model.chat_prompt(later).ids == first + model.encode("a cat", bos=False) + [2] + \
        model.encode("[INST] more [/INST]")
    with pytest.raises(ValueError, match="in turn"):
        model.chat_prompt(turns + [{"role": "user", "content": "twice"}])

    proc = run_cli(module, [model_path, "-z", tok, "-m", "chat", "-y", system, "-i", user,
                            "-t", "0", "-n", "60"])
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.decode().removeprefix("Assistant: ").removesuffix("\n")
    reply = "".join(model.chat(turns, steps=60, temperature=0.0))
    assert reply and printed in (reply, " " + reply)


def test_jinja2_is_imported_only_to_render():
    code = ("import sys, run, runq, llama2_cython.chat; assert 'jinja2' not in sys.modules; "
            "llama2_cython.chat.ChatTemplate('{{ 1 }}', 't', {}).render([{}]); "
            "assert 'jinja2' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
