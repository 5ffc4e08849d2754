"""The ipywidgets chat panel: ``gemma4_nb.chat()`` or ``%gemma panel``.

Works in any frontend that renders ipywidgets (JupyterLab, Notebook 7, VS Code). Requests go
through the same :class:`~gemma4_nb.notebook.chat_service.ChatService` as the sidebar: generation runs on
a worker thread, so Stop works mid-reply.
"""

from __future__ import annotations

import base64
import html
import time

from .chat_service import ChatService, progress_line
from .copilot import get_copilot

STYLE = "white-space:pre-wrap;font-family:var(--jp-code-font-family,monospace);font-size:12px;margin:2px 0"


class ChatPanel:
    def __init__(self, shell=None) -> None:
        import ipywidgets as w

        if shell is None:
            from IPython import get_ipython

            shell = get_ipython()
        self.shell = shell
        self.copilot = get_copilot(shell)
        self.service = ChatService(self.copilot, self._on_event)
        self.w = w
        self.status = w.HTML(self._status_html(self.service.status()))
        self.history = w.VBox([], layout=w.Layout(max_height="480px", overflow="auto"))
        self.input = w.Textarea(placeholder="Ask about your notebook… (Enter sends in JupyterLab, Shift+Enter: new line)",
                                layout=w.Layout(width="100%", height="64px"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.upload = w.FileUpload(accept="image/*,audio/*,.wav,.flac,.ogg,.mp3", multiple=True,
                                   description="Attach")
        self.agent = w.Checkbox(value=False, description="Agent (write and run cells)", indent=False)
        self.output = w.Output()  # code run from the panel when no notebook frontend can take it
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.service.stop())
        self.widget = w.VBox([
            self.status, self.history, self.input,
            w.HBox([self.send_button, self.stop_button, self.upload, self.agent]), self.output,
        ], layout=w.Layout(border="1px solid var(--jp-border-color1, #ccc)", padding="6px"))
        self.widget.add_class("gemma4-nb-panel")
        self._reply = None  # the HTML widget of the streaming reply
        self._text = ""
        self._last = 0.0
        self._link = None  # FrontendLink, made on the first insert

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # -- sending --------------------------------------------------------------------------

    def attachments(self) -> list[dict]:
        out = []
        for f in self.upload.value:  # ipywidgets 8: a tuple of dicts with name, type, content
            out.append({"name": f["name"], "mime": f.get("type", ""),
                        "data": base64.b64encode(bytes(f["content"])).decode()})
        return out

    def send(self, text: str | None = None) -> str | None:
        text = self.input.value if text is None else text
        rid = self.service.submit(text, self.attachments(), agent=self.agent.value)
        if rid is not None:
            self.input.value = ""
            self.upload.value = ()
        return rid

    # -- events (called on the worker thread) -----------------------------------------------

    def _bubble(self, who: str, body: str, color: str):
        return self.w.HTML(f"<div style='{STYLE};border-left:3px solid {color};padding-left:6px'>"
                           f"<b>{who}</b> {body}</div>")

    def _render(self) -> None:
        if self._reply is not None:
            self._reply.value = (f"<div style='{STYLE};border-left:3px solid #2a7;padding-left:6px'><b>gemma</b> "
                                 f"{html.escape(self._text)}</div>")

    def _on_event(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind == "status":
            self.status.value = self._status_html(ev)
        elif kind == "start":
            names = ", ".join(a["name"] for a in ev.get("attachments", []))
            who = html.escape(ev.get("text", "")) + (f" <i>[{html.escape(names)}]</i>" if names else "")
            self._text, self._reply = "", self._bubble("gemma", "…", "#2a7")
            self.history.children = (*self.history.children, self._bubble("you", who, "#36c"), self._reply)
            self.send_button.disabled, self.stop_button.disabled = True, False
        elif kind == "token":
            self._text += ev["text"]
            if time.monotonic() - self._last > 0.1:
                self._render()
                self._last = time.monotonic()
        elif kind in ("code", "note", "skipped", "output"):
            extra = ev.get("code") or ev.get("text", "")
            self.history.children = (*self.history.children,
                                     self._bubble(kind, html.escape(extra), "#999"))
        elif kind == "done":
            self._text = (ev["text"] or self._text) + ("\n\n(stopped)" if ev.get("stopped") else "")
            self._render()
            u = ev.get("usage")
            items = [self._code_row(code) for code in ev.get("code_blocks", [])]
            if u:
                items.append(self.w.HTML(f"<small class='gemma4-usage'>{u['generated_tokens']} tokens, {u['tokens_per_s']:.1f} tokens/s</small>"))
            if ev.get("context"):
                items.append(self.w.HTML(f"<small class='gemma4-context'>context: {html.escape(ev['context'])}</small>"))
            self.history.children = (*self.history.children, *items)
            self._done()
        elif kind == "error":
            children = self.history.children
            if self._reply is not None and not self._text and not self.service.busy:  # its request failed
                children = tuple(c for c in children if c is not self._reply)  # no empty "gemma …" left behind
            self.history.children = (*children, self._bubble("error", html.escape(ev["message"]), "#c33"))
            if not self.service.busy:
                self._done()

    def _done(self) -> None:
        self.send_button.disabled, self.stop_button.disabled = False, True
        self._reply = None

    def _code_row(self, code: str):
        w = self.w
        insert = w.Button(description="Insert below", icon="plus")
        run = w.Button(description="Insert and run", icon="play")
        insert.on_click(lambda _: self.insert(code, run=False))
        run.on_click(lambda _: self.insert(code, run=True))
        return w.VBox([w.HTML(f"<pre style='{STYLE};background:#f6f6f6'>{html.escape(code)}</pre>"),
                       w.HBox([insert, run])])

    def insert(self, code: str, run: bool = False) -> None:
        """A new cell below the active one (through the JupyterLab extension); never overwrites a cell.

        Without a notebook frontend that accepts it, "run" runs the code here and shows its output
        in the panel (a click on "Insert and run" is the approval)."""
        front = self.copilot.frontend
        if front is None:
            if self._link is None:
                try:
                    from .comm import FrontendLink

                    self._link = FrontendLink()
                except Exception:  # no comm support here
                    self._link = False
            front = self._link if self._link and not self._link.closed else None
        if front is not None:
            front.insert_cell(code, run=run)
        if run and front is None:
            with self.output:
                self.shell.run_cell(code, store_history=True)

    @staticmethod
    def _status_html(st: dict) -> str:
        model = ", ".join(str(st[k]) for k in ("model", "model_format", "device") if st.get(k))
        parts = [f"<b>gemma4-nb</b> · {html.escape(str(st.get('state')))}", html.escape(model)]
        if st.get("state") == "loading" and st.get("progress"):
            parts.append(html.escape(progress_line(st["progress"])))
        if st.get("elapsed_s") is not None and st.get("state") == "loading":
            parts.append(f"loading {st['elapsed_s']:.0f} s")
        if st.get("memory_mib"):
            parts.append(f"kernel memory {st['memory_mib']:.0f} MiB")
        if st.get("tokens_per_s"):
            parts.append(f"{st['tokens_per_s']:.1f} tokens/s")
        return "<small>" + " · ".join(p for p in parts if p) + "</small>"


def chat(shell=None) -> ChatPanel:
    """The chat panel for this kernel (display it: it is the last expression of a cell)."""
    return ChatPanel(shell)
