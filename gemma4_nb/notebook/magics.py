"""``%load_ext gemma4_nb``: the ``%%gemma`` cell magic and the ``%gemma`` line magic."""

from __future__ import annotations

import argparse
import html
import shlex
import time

from IPython.core.magic import Magics, line_cell_magic, magics_class

from ..errors import Gemma4Error
from .agent import AgentResult
from .attachments import drop_unsupported, load_attachment
from .chat_service import BUSY
from .copilot import check_setting, get_copilot

HELP = """%%gemma [--agent] [--df NAME ...] [--image X ...] [--audio X ...] [--no-context]
    [--max-new-tokens N] [--temperature T] [--no-draft]
<your question>
    Ask about your notebook. The answer streams below as Markdown. The copilot sees your
    DataFrames, open figures, recent cells and the last error. --agent lets it write code: the
    code appears as a new cell below and runs per the approval setting. --image/--audio take a
    file path or a variable name (a figure, an array, PIL image, bytes...). Speculative drafting
    (prompt lookup; output unchanged) is on unless --no-draft. --max-new-tokens, --temperature
    and --no-draft apply to this cell only (`%gemma config` changes the settings).

%gemma status              model, memory, last reply's speed
%gemma model [REF]         show or set the model (a directory, .gguf file, HF repo id,
                           ollama:<name>[:<tag>] or lmstudio:<publisher>/<repo>; `default`
                           goes back to $GEMMA4_NB_MODEL or the embedded model)
%gemma config [key=value]  show or change settings (approval, max_new_tokens, temperature,
                           context_tokens, max_steps, history_file, first_byte_timeout,
                           quant=auto|bf16|int8|int4: the weight format, reloads the model)
%gemma approval ask|auto|never   ask before running generated code (default), run it, or never
%gemma backend URL [--model NAME] [--no-tools]   use an OpenAI-compatible server (vLLM,
                           llama.cpp, Ollama); `%gemma backend local` returns to the in-kernel model
%gemma context [--df NAME] show what the next question would carry of the notebook (the whole
                           snapshot first, then what changed since the last question)
%gemma panel               a chat panel (ipywidgets) with Send, Stop, attachments
%gemma history             the conversation so far
%gemma reset               forget the conversation (and the cached prompt)
%gemma unload              free the model's memory (reloads on next use)
%gemma help                this text"""


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise Gemma4Error(f"cannot read the magic's arguments ({exc}): close the quote") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Gemma4Error(f"{message}\n\n{HELP}")


def _cell_parser() -> _Parser:
    p = _Parser(prog="%%gemma", add_help=False)
    p.add_argument("--agent", action="store_true")
    p.add_argument("--df", action="append", default=None)
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--audio", action="append", default=[])
    p.add_argument("--no-context", action="store_true")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--no-draft", action="store_true")
    return p


class _Stream:
    """Markdown that grows in place as the reply streams (plain text in a terminal)."""

    def __init__(self, rich: bool) -> None:
        from IPython.display import Markdown, display

        self.rich, self.text, self._last = rich, "", 0.0
        self.Markdown, self._display = Markdown, display
        self.handle = None

    def write(self, delta: str) -> None:
        if self.rich and self.handle is None:  # created on first output: an error leaves no empty box
            self.handle = self._display(self.Markdown(""), display_id=True)
        self.text += delta
        if not self.rich:
            print(delta, end="", flush=True)
        elif time.monotonic() - self._last > 0.1:
            self.handle.update(self.Markdown(self.text))
            self._last = time.monotonic()

    def close(self, text: str | None = None) -> None:
        if text is not None:
            self.text = text
        if self.rich:
            if self.handle is None:
                self.handle = self._display(self.Markdown(""), display_id=True)
            self.handle.update(self.Markdown(self.text or "*(no answer)*"))
        else:
            print()


def _load_with_progress(copilot, rich: bool) -> None:
    """Load the model before a cell's question, saying what loads, how far the runtime is (its
    stage and percentage) and for how long (a line updated as the load moves and every second,
    then how long it took)."""
    import threading

    from IPython.display import Markdown, display

    from .chat_service import ProgressPacer, describe_model, load_progress, progress_line

    name = str(describe_model(copilot)["model"]).replace(" (loads on first use)", "")
    say = lambda text: None  # noqa: E731 - a terminal gets the first and last lines only
    if rich:
        handle = display(Markdown(f"*loading {name}…*"), display_id=True)
        say = lambda text: handle.update(Markdown(f"*{text}*"))  # noqa: E731
    else:
        print(f"loading {name}…", flush=True)
    t0, done = time.monotonic(), threading.Event()

    def show():
        where = progress_line(load_progress(copilot))
        say(f"loading {name}… " + (f"{where} · " if where else "") + f"{time.monotonic() - t0:.0f} s")

    def tick():
        while not done.wait(1.0):
            show()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        copilot.ensure_model(on_progress=ProgressPacer(show))
    except BaseException:
        done.set()
        ticker.join(2)
        say(f"could not load {name} (the reason follows)")
        raise
    done.set()
    ticker.join(2)
    loaded = describe_model(copilot)
    where = ", ".join(str(loaded[k]) for k in ("model_format", "device") if loaded.get(k))
    line = f"loaded {loaded['model']}" + (f" ({where})" if where else "") + f" in {time.monotonic() - t0:.1f} s"
    if rich:
        say(line)
    else:
        print(line)


@magics_class
class GemmaMagics(Magics):
    def __init__(self, shell) -> None:
        super().__init__(shell)
        self.copilot = get_copilot(shell)

    def _ask_approval(self, code: str, why: str) -> bool:
        try:
            answer = input(f"gemma4-nb wants to run this code ({why}):\n{code}\nRun it? [y/N] ")
        except Exception:  # no stdin in this frontend (nbclient, some IDEs): do not run
            if self.copilot.settings.approval == "ask":
                print("(cannot ask here; set `%gemma approval auto` to run generated code)")
            else:  # auto: only code the safety check flagged gets here, and it never runs without a yes
                print("(cannot ask here, so this code was not run: read it in the new cell and run it yourself)")
            return False
        return answer.strip().lower() in ("y", "yes")

    @line_cell_magic
    def gemma(self, line: str, cell: str | None = None):
        try:
            if cell is None:
                return self._line(line)
            return self._cell(line, cell)
        except Gemma4Error as exc:  # a clear message; the kernel and the user's work stay intact
            print(f"gemma4-nb: {exc}")
        except KeyboardInterrupt:  # Stop before generation started: nothing half-done to keep
            print("gemma4-nb: stopped")

    def _cell(self, line: str, cell: str):
        args = _cell_parser().parse_args(_split(line))
        c = self.copilot
        flags = {}  # this cell's own sampling: the settings stay as they are
        if args.max_new_tokens is not None:
            flags["max_new_tokens"] = check_setting("max_new_tokens", args.max_new_tokens)
        if args.temperature is not None:
            flags["temperature"] = check_setting("temperature", args.temperature)
        if args.no_draft:
            flags["draft"] = False
        question = cell.strip()
        if not question:
            raise Gemma4Error("the cell is empty: write a question under %%gemma")
        images = [load_attachment(ref, "image", self.shell.user_ns) for ref in args.image]
        audios = [load_attachment(ref, "audio", self.shell.user_ns) for ref in args.audio]
        rich = getattr(self.shell, "kernel", None) is not None
        stream = _Stream(rich)

        def on_event(kind: str, text: str) -> None:
            if kind == "code":
                stream.write(f"\n\n```python\n{text}\n```\n")
            elif kind == "skipped":
                stream.write(f"\n*{text}*\n")

        c.quiet()  # a warm-up of this very question's start finishes its chunk, then yields
        if not c.lock.acquire(blocking=False):
            raise Gemma4Error(BUSY)
        notes = ""
        try:
            if c.backend is None:
                _load_with_progress(c, rich)
            if images or audios:  # the same note the panels give when the model cannot take them
                c.ensure_model()
                images, audios, kept_back = drop_unsupported(c, images, audios)
                notes = "".join(f"*{note}*\n\n" for note in kept_back)
                stream.write(notes)
            result = c.ask(question, agent=args.agent, frames=args.df, images=images, audios=audios,
                           use_context=not args.no_context, on_text=stream.write, ask_approval=self._ask_approval,
                           on_event=on_event, sampling=flags)
        except KeyboardInterrupt:  # Stop outside the generation loop: keep what was shown
            result = AgentResult(answer=stream.text, stopped=True)
        finally:
            c.lock.release()
        final = notes + result.answer
        if args.agent and result.cells:
            final = stream.text.rstrip() + ("\n\n" + result.answer if result.answer not in stream.text else "")
        seen = f"context: {result.context}" if result.context else ""
        cut = "".join(f"\n\n*({note})*" for note in result.notes)
        stream.close(final + cut + ("\n\n*(stopped)*" if result.stopped else "")
                     + (f"\n\n<sub>{html.escape(seen)}</sub>" if seen and rich else ""))
        if not rich:
            if seen:
                print(f"[{seen}]")
            if c.last_usage is not None:
                print(f"[{c.last_usage.summary()}]")

    def _line(self, line: str):
        parts = _split(line)
        cmd, rest = (parts[0], parts[1:]) if parts else ("status", [])
        c = self.copilot
        reloads = cmd in ("model", "backend") or (cmd == "config" and any(r.startswith("quant") for r in rest))
        if c.lock.locked() and (cmd in ("unload", "reset") or (reloads and rest)):
            raise Gemma4Error(BUSY)  # a chat panel is generating with the model this would replace
        if cmd == "status":
            print(c.status())
        elif cmd == "model":
            if rest:
                c.unload()
                default = rest[0].lower() in ("default", "none")
                c.settings.model = None if default else rest[0]
                print("model: back to the default ($GEMMA4_NB_MODEL, else the embedded Gemma 3 270M; loads on first use)"
                      if default else f"model set to {rest[0]} (loads on first use)")
            else:
                print(c.settings.model or "(default: $GEMMA4_NB_MODEL or the embedded Gemma 3 270M)")
        elif cmd == "backend":
            if not rest:
                print(c.remote_url() or "local (the in-kernel model)")
            elif rest[0] == "local":
                c.use_backend(None)
                print("backend: the in-kernel model")
            else:
                p = _Parser(prog="%gemma backend", add_help=False)
                p.add_argument("url")
                p.add_argument("--model")
                p.add_argument("--no-tools", action="store_true")
                a = p.parse_args(rest)
                c.use_backend(a.url, a.model, tools=not a.no_tools)
                c.ensure_model()
                print(c.backend.status())
        elif cmd == "config":
            quant = c.settings.quant
            try:
                for item in rest:
                    key, _, value = item.partition("=")
                    c.settings.update(key.strip(), value.strip())
            finally:  # a later item's error must not leave the model loaded in the old format
                if c.settings.quant != quant and c.model is not None:
                    c.unload()  # the weights load again in the new format on first use
                    print(f"(the model reloads with quant={c.settings.quant or 'auto'} on first use)")
            for k, v in vars(c.settings).items():
                print(f"{k} = {v}")
        elif cmd == "approval":
            if not rest:
                print(c.settings.approval)
            else:
                c.settings.update("approval", rest[0])
                print(f"approval = {c.settings.approval}")
        elif cmd == "context":
            frames = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--df"] or None
            req = c.prepare("", frames=frames)
            print(f"context: {req.context}")
            if req.update is not None and req.update.text:
                print(("the whole snapshot (the conversation's first question carries it):" if req.update.full
                       else "what changed since the last question:") + "\n\n" + req.update.text)
            elif req.update is not None and req.update.full:
                print("(nothing to show: no dataframes, figures or recent cells)")
            else:
                print("(nothing changed since the last question)")
        elif cmd == "panel":
            from IPython.display import display

            from .panel import ChatPanel

            display(ChatPanel(self.shell))
        elif cmd == "history":
            if not c.turns:
                print("(no conversation yet)")
            for t in c.turns:
                note = " [with attachments]" if t.get("attachments") else ""
                print(f"{t['role']}: {t['content']}{note}\n")
        elif cmd == "reset":
            c.reset()
            print("conversation cleared")
        elif cmd == "unload":
            c.unload()
            print("model unloaded")
        elif cmd in ("help", "-h", "--help"):
            print(HELP)
        else:
            raise Gemma4Error(f"unknown command {cmd!r}\n\n{HELP}")


def load_ipython_extension(ipython) -> None:
    from .comm import register

    from .warmup import register as warm_between_cells

    ipython.register_magics(GemmaMagics)
    register(ipython)  # the JupyterLab sidebar's comm
    warm_between_cells(ipython)


def unload_ipython_extension(ipython) -> None:
    pass
