"""Chat templates: a list of {role, content} messages -> one prompt string.

Design: `tokenizer.chat_template` is Jinja2 source from an untrusted file. It
is compiled and rendered in jinja2's ImmutableSandboxedEnvironment (no
attribute access to internals, no mutation of passed-in lists/dicts), and the
render is bounded three ways:

* time: the render runs on a short-lived worker thread; the caller watches
  the clock and, past the deadline, raises an exception inside that thread
  (CPython's PyThreadState_SetAsyncExc), which interrupts any pure-Python
  loop the template compiles to;
* memory: the watcher also samples the process's resident size and stops a
  render that grows it by more than `max_mem_bytes` (a string doubled in a
  loop). That watcher cannot stop one C-level operation midway, so every
  operation that can build a big string or list in one step is checked for
  size before it runs: `*`, `+`, `**`, `%`, `~` (compiled to a bounded
  join), the str methods and filters that grow text (replace, ljust/center,
  join, indent, format...);
* output: chunks are counted as they are generated; past `max_bytes` the
  render stops.

Any failure — syntax error, `raise_exception(...)` from the template, a
recursion, a limit — becomes ChatTemplateError with a one-line reason.

The environment is the one Hugging Face transformers renders with
(`_compile_jinja_template`): trim_blocks and lstrip_blocks, a trailing newline
of the source dropped (jinja2's default), the loop-control and `{% generation %}`
extensions, and its `tojson` (json.dumps: no HTML escaping, keys unsorted).
Variables, as `apply_chat_template` passes them: `messages`, `tools` and
`documents` (None), `add_generation_prompt`, `bos_token`, `eos_token`, and
the globals `raise_exception(msg)` and `strftime_now(fmt)`. So a model's own
template gives the prompt it was trained on (tests/daemon/test_chat.py renders
the families' real templates both ways).

Fallback: a file with no `tokenizer.chat_template` is rendered as ChatML
(`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n` when add_generation_prompt), the most common
format among small instruct models; FALLBACK_TEMPLATE is that template.
"""
from __future__ import annotations

import ctypes
import datetime
import functools
import json
import re
import threading
import time
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.daemon.budget import rss_bytes   # 0 without /proc: the time bound still holds
from ember.formats.errors import UserError


class ChatTemplateError(UserError, ValueError):
    """The chat template (or the messages given to it) cannot be rendered."""


FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_TEMPLATE_CHARS = 1 << 20
MAX_MESSAGES = 4096
MAX_OP_RESULT = 1 << 20         # largest string/list a single + or * may build
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d+)")  # the width digits of a %-conversion
_FORMAT_SPEC_WIDTH = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")  # a {:>NNNNNNN} field


# ---------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------

class _TemplateRaised(Exception):
    """raise_exception() called by the template."""


class _Interrupted(BaseException):
    """Injected into the render thread past a limit (BaseException: templates can't catch it)."""


def _raise_exception(message: str = "template raised an exception"):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(str(fmt))


MAX_JSON_INDENT = 64


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson filter (json.dumps as is), with the indent bounded."""
    if _size(indent) > MAX_JSON_INDENT or (isinstance(indent, int) and indent > MAX_JSON_INDENT):
        raise _TemplateRaised(f"tojson indent is too large (at most {MAX_JSON_INDENT})")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's part of
    a training prompt with it; rendering a prompt, the body is output as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


def _bound(n: int, what: str) -> None:
    """Refuse, before it is built, a string/list larger than MAX_OP_RESULT."""
    if n > MAX_OP_RESULT:
        raise _TemplateRaised(f"{what} would be too large ({n} > {MAX_OP_RESULT})")


def _int(x: Any, default: int = 0) -> int:
    return x if isinstance(x, int) else default


def _str_growth(s: str, name: str, args: tuple) -> int:
    """Length a growing str method would produce; 0 for methods that can't grow."""
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) \
            and isinstance(args[1], str):
        hits = len(s) + 1 if args[0] == "" else s.count(args[0])
        if len(args) >= 3 and isinstance(args[2], int) and args[2] >= 0:
            hits = min(hits, args[2])
        return len(s) + hits * max(len(args[1]) - len(args[0]), 0)
    if name in ("ljust", "rjust", "center", "zfill") and args:
        return max(len(s), _int(args[0]))
    if name == "expandtabs":
        return len(s) + s.count("\t") * _int(args[0] if args else 8, 8)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return sum(len(str(x)) for x in args[0]) + len(s) * len(args[0])
    return 0


def _bounded_filter(filt, growth):
    """Wrap a built-in filter that can build a large string with a size pre-check."""
    @functools.wraps(filt)          # keeps jinja's pass_eval_context/pass_context marks
    def checked(*args, **kwargs):
        _bound(growth(*args, **kwargs), f"the result of filter {filt.__name__}")
        return filt(*args, **kwargs)
    return checked


def _filter_growth(name: str):
    """Size estimate of filter `name` (arguments as the filter receives them)."""
    def growth(*args, **kwargs):
        args = [a for a in args if not isinstance(a, (jinja2.runtime.Context,
                                                      jinja2.nodes.EvalContext,
                                                      jinja2.Environment))]
        if not args:
            return 0
        value, rest = args[0], args[1:]
        if name == "replace":
            return _str_growth(str(value), "replace", tuple(map(str, rest[:2])) + tuple(rest[2:3]))
        if name == "center":
            return max(_size(str(value)), _int(rest[0] if rest else kwargs.get("width"), 80))
        if name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            pad = len(width) if isinstance(width, str) else _int(width, 4)
            return len(str(value)) * (1 + pad)
        if name == "join" and isinstance(value, (list, tuple)):
            sep = rest[0] if rest else kwargs.get("d", "")
            return sum(len(str(x)) for x in value) + len(str(sep)) * len(value)
        return 0
    return growth


class _BoundedCodeGen(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join instead of jinja2's plain str_join."""

    @optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Env(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus bounds on every operation that can multiply memory.

    A single C-level operation (a concatenation, a str.replace) holds the GIL
    while it builds its result, so the memory watcher cannot stop it midway:
    such operations are checked for size before they run."""

    code_generator_class = _BoundedCodeGen
    intercepted_binops = frozenset(["*", "+", "**", "%"])

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("replace", "center", "indent", "join"):
            self.filters[name] = _bounded_filter(self.filters[name], _filter_growth(name))

    @staticmethod
    def bounded_concat(parts: tuple) -> str:
        parts = [str(p) for p in parts]
        _bound(sum(map(len, parts)), "a ~ concatenation")
        return "".join(parts)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            _bound(_str_growth(owner, getattr(__obj, "__name__", ""), args), "a string method result")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args, **kwargs):
            values = [*args, *kwargs.values()]
            if value.__name__ == "format_map" and args and isinstance(args[0], dict):
                values = list(args[0].values())
            widest = max((len(str(v)) for v in values), default=0)
            _bound(len(fmt) + fmt.count("{") * widest, "a str.format result")
            if _FORMAT_SPEC_WIDTH.search(fmt):
                raise _TemplateRaised("a str.format width is too large")
            return wrapped(*args, **kwargs)
        return checked

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and left.bit_length() * abs(right) > 4096:
            raise _TemplateRaised(f"power {left} ** {right} is too large")
        if operator == "*":
            n = right if isinstance(right, int) else left if isinstance(left, int) else 1
            if max(_size(left), _size(right)) * max(n, 0) > MAX_OP_RESULT:
                raise _TemplateRaised("a repeated string/list would be too large")
        if operator == "+" and _size(left) + _size(right) > MAX_OP_RESULT:
            raise _TemplateRaised("a concatenation would be too large")
        if operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            _bound(len(left) + sum(len(str(v)) for v in values), "a % formatting")
            if any(len(w) > 6 for w in _FORMAT_WIDTH.findall(left)):
                raise _TemplateRaised("a % format width is too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> _Env:
    env = _Env(trim_blocks=True, lstrip_blocks=True,
               extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


# ---------------------------------------------------------------------------
# Bounded rendering
# ---------------------------------------------------------------------------

def _interrupt(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                               ctypes.py_object(_Interrupted))


def _collect(template: jinja2.Template, variables: dict, max_bytes: int, box: dict) -> None:
    """Worker body: render chunk by chunk, stopping past max_bytes."""
    try:
        parts, n = [], 0
        for chunk in template.generate(**variables):
            n += len(chunk)
            if n > max_bytes:
                box["error"] = f"output exceeds the limit of {max_bytes} characters"
                return
            parts.append(chunk)
        box["text"] = "".join(parts)
    except _Interrupted:
        box.setdefault("error", "interrupted")
    except _TemplateRaised as e:
        box["error"] = f"template raised: {e}"
    except RecursionError:
        box["error"] = "template recursed too deeply"
    except Exception as e:  # noqa: BLE001 - anything an untrusted template does is its error
        box["error"] = f"{type(e).__name__}: {e}"


def _render_bounded(template: jinja2.Template, variables: dict, max_bytes: int,
                    timeout_s: float, max_mem_bytes: int) -> str:
    box: dict = {}
    worker = threading.Thread(target=_collect, args=(template, variables, max_bytes, box),
                              name="ember-chat-template", daemon=True)
    base, deadline = rss_bytes(), time.monotonic() + timeout_s
    worker.start()
    while worker.is_alive():
        worker.join(0.005)
        over_time = time.monotonic() > deadline
        over_mem = base and rss_bytes() - base > max_mem_bytes
        if worker.is_alive() and (over_time or over_mem):
            box["error"] = (f"render took longer than {timeout_s:g}s" if over_time else
                            f"render used more than {max_mem_bytes >> 20} MiB")
            _interrupt(worker)
            worker.join(1.0)
            break
    if "error" in box or "text" not in box:
        raise ChatTemplateError(f"chat template: {box.get('error', 'render did not finish')}")
    return box["text"]


# ---------------------------------------------------------------------------
# The public surface
# ---------------------------------------------------------------------------

def check_messages(messages: Any) -> list[dict]:
    """A list of {"role": str, "content": str}; anything else is ChatTemplateError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise ChatTemplateError(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with string 'role' and "
                                    f"'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ChatTemplate:
    """A compiled chat template (the file's, or the ChatML fallback)."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "",
                 max_bytes: int = 1 << 20, timeout_s: float = 1.0,
                 max_mem_bytes: int = 256 << 20):
        self.is_fallback = source is None
        self.source = FALLBACK_TEMPLATE if source is None else source
        if not isinstance(self.source, str) or len(self.source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"chat template must be a string of at most "
                                    f"{MAX_TEMPLATE_CHARS} characters")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.max_bytes, self.timeout_s, self.max_mem_bytes = max_bytes, timeout_s, max_mem_bytes
        try:
            self.template = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None
        except RecursionError:
            raise ChatTemplateError("chat template nests too deeply to compile") from None

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        variables = dict(messages=check_messages(messages), tools=None, documents=None,
                         add_generation_prompt=bool(add_generation_prompt),
                         bos_token=self.bos_token, eos_token=self.eos_token)
        return _render_bounded(self.template, variables, self.max_bytes, self.timeout_s,
                               self.max_mem_bytes)


def render(messages: Any, template: str | None = None, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True, **limits) -> str:
    """One-shot: compile `template` (None: the ChatML fallback) and render `messages`."""
    return ChatTemplate(template, bos_token, eos_token, **limits).render(
        messages, add_generation_prompt)
