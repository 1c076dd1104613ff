"""Chat in a model's own chat template, for run, runq and run_cuda (`-m chat`) and the Python API
(Model.chat, Model.chat_prompt).

A Hugging Face tokenizer folder carries its model's chat template: a Jinja program, in
tokenizer_config.json ("chat_template": a string, or a list of named ones) or in
chat_template.jinja beside it (how transformers >= 4.56 saves it; it wins over the config's). It is
rendered as transformers' apply_chat_template(messages, add_generation_prompt=True) renders it:
the same sandboxed Jinja environment and the same variables (messages, tools and documents None,
add_generation_prompt, the config's special tokens as strings), and the text is tokenized without
added special tokens. The reply ends at an end-of-turn id: the tokenizer's EOS ids and the
config's eos_token (<|eot_id|>, <|im_end|>, </s>).

A run.c tokenizer .bin has no template: the command line runs run.c's chat() (Llama 2's
[INST] format) and the API feeds what that loop feeds (Llama2Format).

jinja2 is imported only when a template is compiled: templates are Jinja programs (loops,
macros, filters, namespaces), and only Jinja itself renders every one of them as transformers
does.
"""
import datetime
import json
import os
import threading
from collections import namedtuple

from . import LlamaError
from .bpe import _Fields, _read_json, _read_text, _token_content

JINJA_MIN_VERSION = (3, 1, 6)  # what transformers requires: older ones have known sandbox escapes
TEMPLATE_FILE = "chat_template.jinja"
MORE_TEMPLATES = "additional_chat_templates"  # name.jinja files: named templates beside the default
# the special tokens transformers always passes to a template (when the config sets them); any
# other "*_token" key of the config holding a token is passed too
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # see _message_data

ChatPrompt = namedtuple("ChatPrompt", "ids text")
ChatPrompt.__doc__ = """What a conversation is fed as: ids, and text, the text they spell."""


# ---------------------------------------------------------------------------- the template

class ChatTemplate:
    """A chat template and the special-token variables it is rendered with.

    >>> template = ChatTemplate.find("SmolLM-360M-Instruct/")   # None when it has none
    >>> template.render([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(self, text, source, special_tokens):
        self.text = text
        self.source = source  # the file it came from, for messages
        self.special_tokens = dict(special_tokens)  # {"eos_token": "<|im_end|>", ...}
        self._compiled = None

    @classmethod
    def find(cls, path):
        """The template of the tokenizer at path (a folder, or a file in it), as transformers'
        from_pretrained finds it in that folder; None when the folder holds none."""
        path = os.fspath(path)
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        config_path = os.path.join(folder, "tokenizer_config.json")
        config = _Fields(config_path, _read_json(config_path), "tokenizer_config.json") \
            if os.path.isfile(config_path) else None

        templates = {}  # name -> (text, source)
        if config is not None:
            value = config.get("chat_template", (str, list, None), None)
            if isinstance(value, str):
                templates["default"] = (value, config_path)
            for i, item in enumerate(value if isinstance(value, list) else []):
                if not isinstance(item, dict):
                    config.fail(f"chat_template[{i}] is not an object with \"name\" and "
                                f"\"template\"")
                entry = _Fields(config_path, item, f"chat_template[{i}]")
                templates[entry.get("name", (str,))] = (entry.get("template", (str,)), config_path)
        # template files win over the config's templates (all of them, as in transformers)
        files = {}
        if os.path.isfile(os.path.join(folder, TEMPLATE_FILE)):
            files["default"] = os.path.join(folder, TEMPLATE_FILE)
        more = os.path.join(folder, MORE_TEMPLATES)
        if os.path.isdir(more):
            for name in sorted(os.listdir(more)):
                if name.endswith(".jinja"):
                    files[name[:-len(".jinja")]] = os.path.join(more, name)
        if files:
            templates = {name: (_read_template(file), file) for name, file in files.items()}
        if not templates:
            return None
        if "default" not in templates:
            names = ", ".join(sorted(templates))
            raise LlamaError(f"{folder}: holds chat templates named {names} and none named "
                             f"\"default\"")
        text, source = templates["default"]
        return cls(text, source, _special_tokens(config, folder))

    def render(self, messages, add_generation_prompt=True, **variables):
        """The text of messages (a list of {"role": ..., "content": ...} dicts), as transformers'
        apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
        **variables) gives it (variables: more template variables, e.g. date_string for Llama
        3.x). A template that refuses the conversation, or fails, raises LlamaError."""
        messages = _message_data(messages)
        if not messages:
            raise ValueError("no messages: a conversation needs at least one")
        template = self._compile()
        values = dict(self.special_tokens)
        values.update(_plain("variables", variables))
        values.update(messages=messages, tools=None, documents=None,
                      add_generation_prompt=bool(add_generation_prompt))
        try:
            return template.render(**values)
        except _Refused as e:  # raise_exception(): a role it does not take, turns out of order
            raise LlamaError(f"{self.source}: the chat template refuses the conversation: "
                             f"{_one_line(e)}") from None
        except Exception as e:  # the template is a program: any of its errors is its own
            raise LlamaError(f"{self.source}: the chat template failed: "
                             f"{type(e).__name__}: {_one_line(e)}") from None

    def _compile(self):
        if self._compiled is None:
            jinja2 = _jinja()
            try:
                self._compiled = _environment().from_string(self.text)
            except jinja2.TemplateSyntaxError as e:
                raise LlamaError(f"{self.source}: chat template line {e.lineno}: "
                                 f"{_one_line(e.message)}") from None
        return self._compiled


def _read_template(path):
    # as transformers reads a template file: in text mode, whose newlines are "\n" whatever the
    # file has ("\r\n", "\r")
    return _read_text(path).replace("\r\n", "\n").replace("\r", "\n")


def _special_tokens(config, folder):
    """{name: token text} of the config's special tokens, as transformers' special_tokens_map:
    the standard names and any other "*_token" key holding a token (a string, or an AddedToken
    object), plus the named tokens of an extra_special_tokens object. A config without
    added_tokens_decoder is an old one: special_tokens_map.json beside it overrides it."""
    tokens = {}
    if config is None:
        return tokens
    sources = [config]
    map_path = os.path.join(folder, "special_tokens_map.json")
    if "added_tokens_decoder" not in config.obj and os.path.isfile(map_path):
        sources.append(_Fields(map_path, _read_json(map_path), "special_tokens_map.json"))
    for fields in sources:
        for key, value in fields.obj.items():
            if key in SPECIAL_TOKEN_NAMES:  # a token, or null: anything else is refused by name
                tokens[key] = _token_content(fields, key, None)
            elif key.endswith("_token") and (isinstance(value, str) or isinstance(value, dict)
                                             and "content" in value):
                tokens[key] = _token_content(fields, key, None)
        extra = fields.get("extra_special_tokens", (dict, list, None), None)
        if isinstance(extra, dict):
            named = _Fields(fields.path, extra, "extra_special_tokens")
            for key in extra:
                tokens[key] = _token_content(named, key, None)
    return {key: value for key, value in tokens.items() if value is not None}


def _message_data(messages):
    """The messages as the template sees them: fresh dicts of plain data, keys whose value is
    None dropped (transformers drops them: templates print "None" for them), and a message's
    reasoning under every name templates read it by (reasoning_content, thinking), as
    transformers passes it."""
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] is a {type(message).__name__}, not a dict")
        message = {key: value for key, value in _plain(f"messages[{i}]", message).items()
                   if value is not None}
        reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(where, value):
    """A copy of value made of JSON data only (str keys; str, int, float, bool, None, lists and
    dicts): a template runs in a sandbox and sees nothing with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}: keys must be strings")
        return {key: _plain(f"{where}[{key!r}]", item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(f"{where}[{i}]", item) for i, item in enumerate(value)]
    raise TypeError(f"{where} is a {type(value).__name__}: a chat template takes strings, "
                    f"numbers, booleans, lists and dicts")


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


_jinja_environment = []  # built on first use


class _Refused(Exception):
    """raise_exception() in a template (a jinja2.TemplateError, made when jinja2 is imported)."""


def _jinja():
    try:
        import jinja2
    except ImportError:
        raise LlamaError("chat templates need jinja2 (pip install 'jinja2>=3.1.6')") from None
    version = tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())
    if version < JINJA_MIN_VERSION:
        raise LlamaError(f"chat templates need jinja2 >= 3.1.6 (older ones have sandbox "
                         f"escapes), this is {jinja2.__version__}")
    return jinja2


def _environment():
    """transformers' chat template environment: an immutable sandbox, trim_blocks and
    lstrip_blocks, loop controls (break, continue), the {% generation %} block (it marks the
    assistant's text for training; rendering just renders it), a tojson that keeps non-ASCII and
    HTML characters as they are, raise_exception(), strftime_now(), and dict() and namespace()
    that give templates no way at Python's internals."""
    if _jinja_environment:
        return _jinja_environment[0]
    jinja2 = _jinja()
    import jinja2.ext
    import jinja2.sandbox

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body) \
                .set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Refused(jinja2.TemplateError, _Refused):
        pass

    def raise_exception(message):
        raise Refused(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    class PlainDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]  # Jinja's own signature: namespace(self=...) works
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a namespace takes no attribute that starts with an underscore: {name!r}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=PlainDict(), namespace=Namespace)
    _jinja_environment.append(env)
    return env


# ---------------------------------------------------------------------------- chat formats
# What a conversation is fed as, what ends a reply, and how the reply's tokens print and read back.

class TemplateFormat:
    """A Hugging Face tokenizer (llama2_cython.hf_tokenizer.HFTokenizer, the engines') and its
    chat template."""

    def __init__(self, tokenizer, template):
        self.tokenizer = tokenizer
        self.template = template
        stop = list(tokenizer.eos_ids)
        eos = template.special_tokens.get("eos_token")
        if eos is not None:
            ids = tokenizer.encode(eos, bos=False)
            if len(ids) != 1:
                raise LlamaError(f"{template.source}: eos_token {eos!r} is not one token of "
                                 f"{tokenizer.source} but {len(ids)}")
            stop += ids
        if not stop:
            raise LlamaError(f"{template.source}: no eos_token, and {tokenizer.source} names no "
                             f"EOS: nothing would end a reply")
        self.stop_ids = frozenset(stop)

    @classmethod
    def of(cls, tokenizer):
        """The format of a Hugging Face tokenizer, whose chat template lies beside its file."""
        template = ChatTemplate.find(tokenizer.source)
        if template is None:
            folder = os.path.dirname(tokenizer.source) or "."
            raise LlamaError(f"{folder}: no chat template (tokenizer_config.json's "
                             f"\"chat_template\", or {TEMPLATE_FILE}) for chat mode")
        return cls(tokenizer, template)

    def prompt(self, messages):
        text = self.template.render(messages, add_generation_prompt=True)
        # no special tokens added (add_special_tokens=False): the template writes them
        return ChatPrompt(self.tokenizer.encode(text, bos=False), text)

    def printer(self):
        """token -> the bytes to print: the token's own bytes (a character may span tokens),
        which make the reply's decode(): a sentencepiece-style decoder drops the text's first
        space, so the reply's first piece loses it."""
        at_start = [self.tokenizer.tokenizer.strips_first_space]

        def piece(token):
            data = self.tokenizer.piece(token)
            if at_start[0] and data:
                at_start[0] = False
                if data[:1] == b" ":
                    return data[1:]
            return data
        return piece

    def reply_text(self, ids):
        return self.tokenizer.decode(ids)


class Llama2Format:
    """run.c's tokenizer .bin and what run.c's chat loop feeds: each user turn is BOS +
    "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]" (the system part in the first turn
    only, when there is one) or BOS + "[INST] {user} [/INST]", and each reply is followed by EOS.
    A reply's text is what sentencepiece decodes it to (run.c prints a space before it: the first
    piece's word-start space, which encoding the text puts back)."""
    BOS, EOS = 1, 2

    def __init__(self, tokenizer, printable):
        self.tokenizer = tokenizer
        self.printable = printable  # the engine's safe_printf test
        self.stop_ids = frozenset((self.EOS,))

    def prompt(self, messages):
        messages = _message_data(messages)
        system = None
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0], messages[1:]
            if not isinstance(system.get("content", ""), str):
                raise ValueError("message 0: Llama 2's chat format takes a system message of "
                                 f"text, got {type(system['content']).__name__}")
        if len(messages) % 2 == 0:
            raise ValueError("Llama 2's chat format needs user and assistant messages in turn, "
                             "ending with a user message (after an optional system message)")
        ids = []
        for i, message in enumerate(messages):
            role = message.get("role")
            content = message.get("content", "")
            if role != ("user", "assistant")[i % 2] or not isinstance(content, str):
                raise ValueError(f"message {i + (system is not None)}: Llama 2's chat format "
                                 f"takes text messages from user and assistant in turn, after "
                                 f"an optional system message; got role {role!r}")
            if role == "assistant":
                ids += self.tokenizer.encode(content, False, False) + [self.EOS]
            elif i == 0 and system is not None and system.get("content"):
                ids += self.tokenizer.encode("[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]"
                                             % (system["content"], content), True, False)
            else:
                ids += self.tokenizer.encode("[INST] %s [/INST]" % content, True, False)
        printed = [self.tokenizer.decode(prev, token) for prev, token in zip([0] + ids, ids)]
        return ChatPrompt(ids, b"".join(printed).decode("utf-8", "replace"))

    def printer(self):
        prev = [self.BOS]  # the first piece loses its leading space, as after BOS

        def piece(token):
            text = self.tokenizer.decode(prev[0], token)
            prev[0] = token
            return text if self.printable(text) else b""
        return piece

    def reply_text(self, ids):
        piece = self.printer()
        return b"".join(piece(token) for token in ids).decode("utf-8", "replace")


def chat_format(engine, tokenizer):
    """The chat format of a tokenizer: its template for a Hugging Face one, run.c's Llama 2
    format for the engine's (run.c's tokenizer .bin)."""
    if isinstance(tokenizer, engine.Tokenizer):
        return Llama2Format(tokenizer, engine.printable)
    return TemplateFormat.of(tokenizer)


# ---------------------------------------------------------------------------- the conversation

class Conversation:
    """A conversation on one run state (KV cache). Each respond() feeds the conversation so far:
    the tokens it shares from the start with what the cache holds stay, and only the rest goes
    through the model (the cache past them is overwritten); then it samples the reply.

    tokens: the ids the KV cache holds, position by position (what the model has seen).
    """

    def __init__(self, transformer, chat_format, sampler, steps):
        self.transformer = transformer
        self.format = chat_format
        self.sampler = sampler
        self.steps = steps  # positions 0..steps-1 may be fed, as run.c's chat loop
        self.tokens = []
        self.full = False  # steps ran out: the conversation can go no further
        self.turn_ended = False  # the last reply ended at an end-of-turn id
        self.unfit = 0  # the length of a prompt that did not fit in steps (0: every one fit)
        # held while a reply is being read: a turn rewinds and overwrites the KV cache and
        # self.tokens, so a second turn between the first's tokens would put them at its positions
        self._turn = threading.Lock()

    def respond(self, messages):
        """Yields the reply's token ids as they are sampled. It ends at an end-of-turn id (not
        yielded; fed into the cache, as run.c feeds EOS, when a position is left for it:
        self.turn_ended), or when steps run out (self.full; also when the prompt itself does
        not fit). One turn at a time: a reply started while another's is still being read
        (interleaved, or in another thread) is refused with LlamaError before it touches
        anything; finish or close() the first."""
        if not self._turn.acquire(blocking=False):
            raise LlamaError("this conversation is still answering another message: finish or "
                             "close() that reply first")
        try:
            yield from self._respond(messages)
        finally:
            self._turn.release()

    def _respond(self, messages):
        self.turn_ended = False
        ids = self.format.prompt(messages).ids
        if not ids:
            raise LlamaError("the chat prompt is empty: the template rendered no tokens")
        if len(ids) > self.steps:
            self.full = True
            self.unfit = len(ids)
            return
        keep = 0
        limit = min(len(self.tokens), len(ids) - 1)  # the last token is fed for its logits
        while keep < limit and self.tokens[keep] == ids[keep]:
            keep += 1
        # what the cache holds from keep on is overwritten now: forgotten first, so that a feed
        # cut short (Ctrl-C, an error) leaves no stale tokens for the next turn to keep
        self.tokens = self.tokens[:keep]
        logits = self._feed(ids[keep:], keep)
        self.tokens = list(ids)
        while True:
            token = self.sampler.sample(logits)
            if token in self.format.stop_ids:
                self.turn_ended = True
                if len(self.tokens) < self.steps:
                    self.transformer.forward(token, len(self.tokens))
                    self.tokens.append(token)
                self.full = len(self.tokens) >= self.steps
                return
            yield token
            if len(self.tokens) >= self.steps:
                self.full = True
                return
            logits = self.transformer.forward(token, len(self.tokens))
            self.tokens.append(token)

    def _feed(self, ids, pos):
        # the prompt's tokens together (run, runq); an engine without a batched forward
        # (run_cuda) takes them one at a time
        if hasattr(self.transformer, "forward_prompt"):
            return self.transformer.forward_prompt(ids, pos)
        for i, token in enumerate(ids):
            logits = self.transformer.forward(token, pos + i)
        return logits


def chat_loop(transformer, tokenizer, sampler, cli_user_prompt, cli_system_prompt, steps,
              read_stdin, write):
    """`-m chat` with a Hugging Face tokenizer: run.c's chat loop in its model's template. The
    same prompts and output as run.c's chat(): the system prompt (from stdin unless -y), the
    user's turns (-i, then stdin), "Assistant: " and the reply; it ends at the end of input or
    when steps run out. read_stdin(guide) -> bytes or None and write(bytes) are the engine's
    (C's stdout, as its own loops print)."""
    chat = Conversation(transformer, TemplateFormat.of(tokenizer), sampler, steps)
    messages = []
    system_prompt = cli_system_prompt
    if system_prompt is None:
        system_prompt = read_stdin(b"Enter system prompt (optional): ") or b""
    if system_prompt:
        messages.append({"role": "system", "content": _text("system prompt", system_prompt)})
    user_prompt = cli_user_prompt
    while not chat.full:
        if user_prompt is None:
            user_prompt = read_stdin(b"User: ")
            if user_prompt is None:
                break
        messages.append({"role": "user", "content": _text("user prompt", user_prompt)})
        user_prompt = None
        write(b"Assistant: ")
        reply = []
        piece = chat.format.printer()  # each reply printed as its decode (reply_text) spells it
        for token in chat.respond(messages):
            reply.append(token)
            write(piece(token))
        if chat.turn_ended:
            write(b"\n")
        messages.append({"role": "assistant", "content": chat.format.reply_text(reply)})
    write(b"\n")


def _text(what, line):
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaError(f"the {what} is not UTF-8 (byte {e.start}: {line[e.start]:#04x}); "
                         f"a chat template takes text") from None

