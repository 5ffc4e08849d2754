"""The agent loop: the model writes code, the code becomes a cell, runs (per the approval
setting), and the model sees its output, errors and figures before it answers or tries again.

Tools use Gemma 4's native tool-call format. Models without tool calling (the embedded Gemma 3
270M, a base model) get a code-completion protocol instead: a commented Python prompt that
describes the data and the task, the completion is the cell, and a failed run is retried with
the error in the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..backends.base import Backend
from ..backends.toolcalls import ToolCall
from .code_safety import analyse_code
from .context import (
    clean_text,
    describe_figure,
    describe_frame,
    describe_variable,
    failure,
    open_figures,
    user_variables,
)

APPROVALS = ("ask", "auto", "never")

TOOLS = [
    {"type": "function", "function": {
        "name": "run_python", "description": "Run Python code in the user's notebook (as a new cell below) and return its output.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the code"}},
                       "required": ["code"]}}},
    {"type": "function", "function": {
        "name": "inspect_dataframe", "description": "Shape, dtypes, nulls, summary statistics and first rows of a DataFrame.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
    {"type": "function", "function": {
        "name": "list_variables", "description": "The user's variables with their types and shapes.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "capture_figure", "description": "Look at the current matplotlib figure.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "final_answer", "description": "Give the final answer to the user, in Markdown.",
        "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}},
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

CODE_PRIMER = "import pandas as pd\n"
CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


@dataclass
class AgentSettings:
    approval: str = "ask"  # ask before running (default), run automatically, or never run
    max_steps: int = 6
    max_failed_runs: int = 3


@dataclass
class Step:
    kind: str  # "tool", "code", "answer", "error"
    detail: str
    result: str = ""


@dataclass
class AgentResult:
    answer: str
    steps: list[Step] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)  # code inserted as new cells
    stopped: bool = False
    messages: list[dict] = field(default_factory=list)  # what the run added to the conversation, as sent
    transcript: str | None = None  # the code-completion protocol's last prompt and what it generated
    context: str = ""  # one line: what the model saw of the notebook (snapshot.NotebookView.summary)
    notes: list[str] = field(default_factory=list)  # what went wrong on the way (a reply the server cut off)


class Agent:
    def __init__(self, backend: Backend, workspace, settings: AgentSettings, *,
                 ask: Callable[[str, str], bool] | None = None, on_event: Callable[[str, str], None] | None = None,
                 sampling: dict | None = None) -> None:
        if settings.approval not in APPROVALS:
            raise ValueError(f"approval must be one of {APPROVALS}, got {settings.approval!r}")
        self.backend, self.ws, self.settings = backend, workspace, settings
        self.ask = ask or (lambda code, why: False)
        self.on_event = on_event or (lambda kind, text: None)
        self.sampling = sampling or {}

    # -- tools ------------------------------------------------------------------------------

    def _approved(self, code: str) -> tuple[bool, str]:
        """Whether to run ``code``, and what the model and the user are told when it is not run.
        Even in "auto", code the safety check finds risky or cannot decide asks first."""
        mode = self.settings.approval
        if mode == "never":
            return False, "not run: the approval setting is 'never'; the code is in a new cell for the user to run"
        shell = getattr(self.ws, "shell", None)
        check = analyse_code(code, namespace=getattr(self.ws, "namespace", None),
                             transform=getattr(shell, "transform_cell", None))
        if mode == "auto" and check.safe:
            return True, ""
        why = check.reason() or "it was written by the model"
        self.on_event("step", "waiting for your approval")
        if self.ask(code, why):
            return True, ""
        return False, (f"not run: {why}, and the user did not approve it; the code is in a new cell below "
                       "for the user to read and run")

    def run_code(self, code: str, result: AgentResult) -> tuple[str, bool]:
        """Insert ``code`` as a cell below, run it if approved; return (what the model sees, failed)."""
        result.cells.append(code)
        self.ws.insert_cell(code)
        self.on_event("code", code)
        ok, reason = self._approved(code)
        if not ok:
            self.on_event("skipped", reason)
            return reason, False
        self.on_event("step", "running the cell")
        run = self.ws.run_code(code)
        self.on_event("output", run.summary())
        self.on_event("step", "reading the output")
        return run.summary(), run.failed

    def call_tool(self, call: ToolCall, result: AgentResult) -> tuple[str, bool]:
        args = call.arguments
        if call.name == "run_python":
            code = args.get("code")
            if not isinstance(code, str) or not code.strip():
                return "error: run_python needs a non-empty 'code' string", False
            return self.run_code(code, result)
        if call.name == "inspect_dataframe":
            name = args.get("name")
            obj = self.ws.namespace.get(name) if isinstance(name, str) else None
            if obj is None or type(obj).__name__ not in ("DataFrame", "Series"):
                frames = [k for k, v in user_variables(self.ws.namespace).items() if type(v).__name__ in ("DataFrame", "Series")]
                return f"error: no DataFrame named {name!r}; dataframes: {', '.join(frames) or 'none'}", False
            try:
                text = describe_frame(name, obj)
            except Exception as exc:  # an odd frame (repeated column names, a broken dtype): say so
                text = f"`{name}`: {type(obj).__name__}; it could not be described ({failure(exc)})"
            try:
                text += "\nsummary:\n" + obj.describe().to_string()[:3000]
            except Exception as exc:  # describe() can fail on odd dtypes: say so, keep going
                text += f"\n(describe() failed: {failure(exc)})"
            return clean_text(text), False
        if call.name == "list_variables":
            items = user_variables(self.ws.namespace)
            return "\n".join(describe_variable(k, v) for k, v in items.items()) or "(no variables)", False
        if call.name == "capture_figure":
            figs = open_figures()
            return (describe_figure(figs[-1]) if figs else "there is no open matplotlib figure"), False
        return f"error: unknown tool {call.name!r}; the tools are {', '.join(TOOL_NAMES)}", False

    # -- the loop ---------------------------------------------------------------------------

    def run(self, messages: list[dict], on_text: Callable[[str], None] | None = None,
            code_prompt: str | None = None) -> AgentResult:
        """Native tool calls when the backend supports them; otherwise the code-completion
        protocol on ``code_prompt`` (a commented Python prompt ending where code should start)."""
        if not self.backend.supports_tools and code_prompt is not None:
            return self._run_completion(code_prompt, on_text)
        result = AgentResult(answer="")
        failed_runs, last_failed = 0, False
        for step in range(self.settings.max_steps):
            self.on_event("step", "writing" if step == 0 else "retrying: the code failed" if last_failed
                          else "continuing with the output")
            reply = self.backend.complete(messages, tools=TOOLS, on_text=on_text, **self.sampling)
            if reply.stopped:
                result.answer, result.stopped = reply.text, True
                result.messages.append({"role": "assistant", "content": reply.text})
                return result
            if reply.cut:  # a cut-off reply is not acted on
                result.answer = reply.text.strip()
                result.notes.append(reply.cut)
                result.messages.append({"role": "assistant", "content": reply.text})
                return result
            if reply.errors:
                note = "; ".join(reply.errors)
                result.steps.append(Step("error", note))
                retry = [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": f"Your tool call was malformed ({note}). "
                          f"Write it again in the tool-call format, or answer directly."}]
                messages = messages + retry
                result.messages += retry
                continue
            if not reply.tool_calls:
                blocks = CODE_BLOCK.findall(reply.text)
                if blocks and not result.cells:  # the model wrote code instead of calling the tool
                    reply.tool_calls = [ToolCall("run_python", {"code": blocks[0]})]
                else:
                    result.answer = reply.text.strip()
                    result.steps.append(Step("answer", result.answer))
                    result.messages.append({"role": "assistant", "content": reply.text})
                    return result
            final = next((c for c in reply.tool_calls if c.name == "final_answer"), None)
            if final is not None:
                result.answer = str(final.arguments.get("answer", "")).strip() or reply.text.strip()
                result.steps.append(Step("answer", result.answer))
                result.messages.append({"role": "assistant", "content": reply.text,
                                        "tool_calls": [final.as_message_part()]})
                return result
            calls_msg = {"role": "assistant", "content": reply.text,
                         "tool_calls": [c.as_message_part() for c in reply.tool_calls]}
            tool_msgs = []
            for call in reply.tool_calls:
                output, failed = self.call_tool(call, result)
                result.steps.append(Step("tool", call.name, output))
                if output.startswith("interrupted"):
                    result.answer, result.stopped = "Stopped: the code was interrupted.", True
                    return result
                failed_runs += failed
                last_failed = bool(failed)
                tool_msgs.append({"role": "tool", "name": call.name, "tool_call_id": call.id, "content": output})
            messages = messages + [calls_msg] + tool_msgs
            result.messages += [calls_msg] + tool_msgs
            if failed_runs >= self.settings.max_failed_runs:
                result.answer = (f"The code failed {failed_runs} times; the last error is in the output above. "
                                 "Try rephrasing the request.")
                return result
        result.answer = f"Stopped after {self.settings.max_steps} steps without a final answer."
        return result

    def _run_completion(self, prompt: str, on_text) -> AgentResult:
        result = AgentResult(answer="")
        primer = prompt[prompt.rfind("\n\n") + 2 :] if "\n\n" in prompt else ""  # code the prompt already began
        sampling = dict(self.sampling)
        sampling["max_new_tokens"] = min(sampling.get("max_new_tokens", 256), 256)
        for attempt in range(self.settings.max_failed_runs):
            self.on_event("step", "writing code" if attempt == 0 else "retrying: the code failed")
            reply = self.backend.complete_text(prompt, stop=["\n"], **sampling)
            result.transcript = prompt + reply.text  # what the model has seen and written so far
            if reply.stopped:
                result.answer, result.stopped = "", True
                return result
            if reply.cut:  # a cut-off line of code is not run
                result.notes.append(reply.cut)
                return result
            code = (primer + reply.text).strip("\n")
            if primer.startswith(CODE_PRIMER) and "result" in primer:
                code += "\nresult"  # show the value the line computed
            if not reply.text.strip():
                result.answer = "The model wrote no code for this request."
                return result
            output, failed = self.run_code(code, result)
            result.steps.append(Step("tool", "run_python", output))
            if output.startswith("interrupted"):
                result.answer, result.stopped = "Stopped: the code was interrupted.", True
                return result
            if not failed:
                break
            last = output.strip().splitlines()[-1] if output.strip() else "error"
            prompt = prompt[: len(prompt) - len(primer)] + code + f"\n# That failed with: {last}\n# Fixed code:\n" + primer
        else:
            result.answer = f"The code failed {self.settings.max_failed_runs} times; the last error is in the output above."
            return result
        shown = "\n".join("# " + line for line in output.splitlines()[:12])
        final = prompt[: len(prompt) - len(primer)] + code + f"\n# Output:\n{shown}\n# In one sentence, the answer is:"
        self.on_event("step", "writing the answer")
        answer = self.backend.complete_text(final, stop=["\n"], **sampling)
        result.transcript = final + answer.text
        result.answer = answer.text.strip().lstrip("# ").strip() or "Done: the output is under the cell."
        result.steps.append(Step("answer", result.answer))
        if on_text:
            on_text(result.answer)
        return result
