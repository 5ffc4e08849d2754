"""What code the agent wants to run could do beyond computing: a static analysis of its syntax tree.

The approval setting asks before code that deletes, moves or overwrites files, runs a shell or
another program, wipes or replaces the user's variables (or ends the kernel), installs packages,
or reaches the network, and before code this analysis cannot decide (code that does not parse,
``exec`` of a computed string, a computed attribute name, a magic it does not know). It is a seat
belt, not a sandbox: see docs/security.md for what it cannot see.

The analysis reads the code as the kernel will run it: IPython's own transformation first (``!cmd``,
``%%bash``, ``%reset``, automagics become ``get_ipython()`` calls), then Python's ``ast``. Names are
followed through imports and aliases (``import os as o``, ``from os import remove as rm``,
``f = os.remove``, ``getattr(os, "remove")``, ``__import__("os")``, ``sys.modules["os"]``) and through
the user's namespace (an ``os`` imported in an earlier cell). Writers (``open(..., "w")``,
``df.to_csv``, ``np.save``, ``Path.write_text``...) ask when their target exists or cannot be worked
out; a new file is not a risk.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import types
from dataclasses import dataclass, field

FILES, SHELL, NAMESPACE, INSTALL, NETWORK, UNCHECKABLE = "files", "shell", "namespace", "install", "network", "uncheckable"
KINDS = {
    FILES: "deletes, moves or overwrites files",
    SHELL: "runs a shell command or another program",
    NAMESPACE: "wipes or replaces your variables, or ends the kernel",
    INSTALL: "installs or removes packages",
    NETWORK: "reaches the network",
    UNCHECKABLE: "cannot be checked before it runs",
}
MAX_DEPTH = 4  # exec("...") inside %time inside run_cell(...): deeper nesting is not followed

# -- what qualified names do -------------------------------------------------------------------
# A name matches a pattern when it equals it or continues it with "."; a pattern ending in "*"
# matches any name that starts with it.
ALWAYS = {
    FILES: ("os.remove", "os.unlink", "os.rmdir", "os.removedirs", "os.rename", "os.renames", "os.replace",
            "os.truncate", "shutil.rmtree", "shutil.move", "shutil.chown", "shutil.unpack_archive",
            "shutil.make_archive", "send2trash", "pathlib.Path.unlink", "pathlib.Path.rmdir",
            "pathlib.Path.rename", "pathlib.Path.replace", "os.chmod", "os.lchmod"),
    SHELL: ("subprocess", "os.system", "os.popen", "os.exec*", "os.spawn*", "os.posix_spawn*", "os.fork",
            "os.forkpty", "os.startfile", "pty", "asyncio.create_subprocess_exec", "asyncio.create_subprocess_shell",
            "sh", "plumbum", "pexpect", "IPython.shell.system", "IPython.shell.system_raw",
            "IPython.shell.system_piped", "IPython.shell.getoutput", "IPython.utils.process"),
    NAMESPACE: ("os._exit", "os.abort", "os.kill", "os.killpg", "signal.raise_signal", "signal.pthread_kill",
                "builtins.exit", "builtins.quit", "IPython.shell.reset", "IPython.shell.reset_selective",
                "IPython.shell.del_var", "IPython.shell.drop_by_id", "IPython.shell.push", "IPython.shell.ask_exit",
                "IPython.shell.init_user_ns", "IPython.shell.clear_main_mod_cache"),
    INSTALL: ("pip", "ensurepip", "conda.cli", "mamba", "micromamba", "setuptools.command"),
    NETWORK: ("socket", "ssl", "requests", "urllib.request", "urllib3", "http.client", "http.server", "socketserver",
              "httpx", "aiohttp", "ftplib", "smtplib", "poplib", "imaplib", "nntplib", "telnetlib", "xmlrpc",
              "paramiko", "websocket", "websockets", "pycurl", "grpc", "boto3", "botocore", "google.cloud",
              "azure", "webbrowser", "selenium", "mechanize", "huggingface_hub", "kaggle", "kagglehub", "gdown",
              "wget", "yfinance", "pandas_datareader", "openai", "anthropic", "zmq", "asyncio.open_connection",
              "asyncio.start_server", "asyncio.open_unix_connection", "asyncio.start_unix_server",
              "seaborn.load_dataset", "sklearn.datasets.fetch_*", "torch.hub", "keras.utils.get_file",
              "tensorflow.keras.utils.get_file", "nltk.download", "spacy.cli.download", "datasets.load_dataset",
              "numpy.DataSource", "antigravity"),
    UNCHECKABLE: ("runpy", "code.interact", "code.InteractiveConsole", "ctypes", "cffi", "marshal.loads",
                  "types.FunctionType", "types.CodeType", "importlib.reload", "IPython.shell.run_code",
                  "IPython.shell.safe_execfile", "IPython.shell.safe_run_module", "IPython.shell.ex",
                  "IPython.shell.ev", "IPython.shell.run_ast_nodes", "IPython.shell.set_next_input",
                  "builtins.breakpoint"),
}
# writers: qualified name -> (position, keyword) of the file they write
WRITERS = {
    "numpy.save": (0, "file"), "numpy.savez": (0, "file"), "numpy.savez_compressed": (0, "file"),
    "numpy.savetxt": (0, "fname"), "torch.save": (1, "f"), "joblib.dump": (1, "filename"),
    "matplotlib.pyplot.savefig": (0, "fname"), "scipy.io.savemat": (0, "file_name"),
    "scipy.io.wavfile.write": (0, "filename"), "soundfile.write": (0, "file"), "imageio.imwrite": (0, "uri"),
    "imageio.v3.imwrite": (0, "uri"), "cv2.imwrite": (0, "filename"), "shutil.copy": (1, "dst"),
    "shutil.copy2": (1, "dst"), "shutil.copyfile": (1, "dst"), "shutil.copytree": (1, "dst"),
    "shutil.copymode": (1, "dst"), "shutil.copystat": (1, "dst"), "os.link": (1, "dst"), "os.symlink": (1, "dst"),
}
# openers: qualified name -> (position of the path, position of the mode, default mode)
OPENERS = {
    "builtins.open": (0, 1, "r"), "io.open": (0, 1, "r"), "codecs.open": (0, 1, "r"), "gzip.open": (0, 1, "rb"),
    "bz2.open": (0, 1, "rb"), "lzma.open": (0, 1, "rb"), "tarfile.open": (0, 1, "r"), "zipfile.ZipFile": (0, 1, "r"),
    "os.fdopen": (None, 1, "r"), "gzip.GzipFile": (0, 1, "rb"),
    "shelve.open": (0, 1, "c"), "dbm.open": (0, 1, "r"),
}
# method names that write a file whatever object they are called on: name -> (position, keywords)
WRITER_METHODS = {
    **{m: (0, ("path_or_buf", "path", "excel_writer", "buf", "fname", "path_or_buffer", "filepath"))
       for m in ("to_csv", "to_excel", "to_parquet", "to_json", "to_pickle", "to_feather", "to_hdf", "to_stata",
                 "to_html", "to_latex", "to_markdown", "to_xml", "to_orc", "to_string", "to_netcdf", "to_zarr")},
    "tofile": (0, ("fid",)), "savefig": (0, ("fname",)), "save": (0, ("fp", "filename", "path", "fname", "file", "f")),
    "write_image": (0, ("file",)), "write_html": (0, ("file",)), "write_json": (0, ("file",)),
    "dump_model": (0, ("fname",)), "save_model": (0, ("fname", "filepath")), "save_pretrained": (0, ("save_directory",)),
}
ALWAYS_METHODS = {FILES: ("unlink", "rmdir", "rmtree", "extractall", "removedirs"), NETWORK: ("from_pretrained",
                  "urlopen", "urlretrieve"), SHELL: ("system", "getoutput", "check_output", "Popen")}
PATH_METHODS = ("rename", "replace")  # file operations on a path; the same names are harmless on strings and frames
NAMESPACE_METHODS = ("update", "clear", "pop", "popitem", "setdefault", "__setitem__", "__delitem__")
RISKY_METHOD_NAMES = {m for names in ALWAYS_METHODS.values() for m in names} | set(WRITER_METHODS) | \
    set(PATH_METHODS) | {"write_text", "write_bytes", "open"}
PATH_FACTORIES = ("pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
                  "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib.Path.cwd", "pathlib.Path.home",
                  "pathlib.Path.expanduser", "pathlib.Path.resolve")
PATH_RETURNING = ("with_suffix", "with_name", "with_stem", "resolve", "absolute", "expanduser", "joinpath",
                  "relative_to", "glob", "rglob", "iterdir", "parent", "parents", "cwd", "home")
BUFFERS = ("io.StringIO", "io.BytesIO", "sys.stdout", "sys.stderr", "tempfile")
INTERNALS = ("__globals__", "__builtins__", "__code__", "__subclasses__", "__closure__", "f_globals", "f_locals",
             "f_builtins", "gi_frame", "tb_frame")

# IPython magics
SAFE_MAGICS = {"matplotlib", "config", "precision", "pwd", "who", "whos", "who_ls", "lsmagic", "magic", "pinfo",
               "pinfo2", "pdef", "pdoc", "psource", "pfile", "page", "quickref", "xmode", "colors", "pprint",
               "load_ext", "reload_ext", "unload_ext", "autoreload", "aimport", "env", "autoawait", "automagic",
               "autocall", "doctest_mode", "tb", "markdown", "latex", "cd", "pushd", "popd", "dirs", "dhist",
               "psearch", "set_env", "alias_magic", "history", "notebook_name", "code_wrap"}
PYTHON_MAGICS = {"time", "timeit", "prun", "capture"}  # the rest of the line, or the cell body, is Python
SHELL_MAGICS = {"system", "sx", "sc", "bash", "sh", "zsh", "script", "perl", "ruby", "python", "python2", "python3",
                "pypy", "!", "ls", "cat", "clear", "less", "more", "man", "ldir", "lf", "lk", "ll", "lx", "mkdir",
                "cp", "mv", "rm", "rmdir"}
FILE_SHELL_MAGICS = {"cp", "mv", "rm", "rmdir"}
INSTALL_MAGICS = {"pip", "conda", "mamba", "micromamba", "uv"}
INSTALL_READ_ONLY = {"list", "show", "freeze", "check", "help", "info", "search", "--version", "-V", "config", "inspect"}
NAMESPACE_MAGICS = {"reset", "reset_selective", "xdel", "killbgscripts"}
FILE_MAGICS = {"writefile", "file", "save", "notebook", "logstart", "store"}
BROWSER_MAGICS = {"javascript", "js", "html", "svg"}
CWD_MAGICS = {"cd", "pushd", "popd"}

URL = re.compile(r"\b(?:https?|ftp|ftps|s3|s3a|gs|gcs|az|abfss?|adl|hf|wss?|sftp|ssh)://", re.I)
INSTALL_COMMAND = re.compile(r"\b(?:pip3?|conda|mamba|micromamba|uv|apt|apt-get|yum|dnf|brew|npm|yarn|pnpm|gem|cargo)\b"
                             r"[^\n;|&]*?\b(?:install|uninstall|remove|add|update|upgrade|sync)\b")
FILE_COMMAND = re.compile(r"(?:^|[\s;&|(`])(?:rm|mv|cp|dd|shred|truncate|rmdir|unlink|chmod|chown|tee|rsync)\b|>")
# names that, unbound in the code and absent from the namespace, most likely mean these modules
CONVENTIONS = {"np": "numpy", "pd": "pandas", "plt": "matplotlib.pyplot", "sns": "seaborn", "tf": "tensorflow"}
KNOWN_MODULES = {"os", "shutil", "subprocess", "sys", "pathlib", "socket", "requests", "urllib", "httpx", "pip",
                 "importlib", "builtins", "io", "codecs", "ctypes", "runpy", "signal", "pty", "asyncio", "webbrowser",
                 "send2trash", "glob", "numpy", "pandas", "torch", "joblib", "pickle", "tarfile", "zipfile",
                 "gzip", "fileinput", "operator", "IPython", "tempfile"}
MODULE_ALIASES = {"posix": "os", "nt": "os", "pathlib._local": "pathlib", "_io": "io", "genericpath": "os.path",
                  "posixpath": "os.path", "ntpath": "os.path", "_socket": "socket"}


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    what: str  # the spelling that raised it, e.g. "os.remove('data.csv')"
    line: int = 0

    def describe(self) -> str:
        return f"{self.what} (line {self.line})" if self.line else self.what


@dataclass
class Analysis:
    code: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.findings

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for f in self.findings}, key=list(KINDS).index)

    def reason(self) -> str:
        """What the code does that needs a yes, e.g. "it deletes, moves or overwrites files
        (os.remove('data.csv'), line 2)"; empty when nothing was found."""
        parts = []
        for kind in self.kinds:
            items = [f.describe() for f in self.findings if f.kind == kind]
            shown = "; ".join(dict.fromkeys(items[:3])) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")
            parts.append(f"{KINDS[kind]}: {shown}")
        return ("it " + " | ".join(parts)) if parts else ""


def analyse_code(code: str, *, namespace: dict | None = None, transform=None, cwd: str | None = None) -> Analysis:
    """The findings for ``code`` (a cell's text) as the kernel would run it.

    ``namespace``: the user's variables (names bound in earlier cells are followed, and ``del`` of
    one of them is a finding); ``transform``: the shell's ``transform_cell`` (IPython's default
    transformer when None); ``cwd``: where relative paths point (the current directory)."""
    result = Analysis(code)
    try:
        _Analyser(result, namespace, transform, cwd or os.getcwd()).cell(code, depth=0, line=0)
    except Exception as exc:  # the seat belt never breaks the agent: what it cannot check, it asks about
        result.findings.append(Finding(UNCHECKABLE, f"the check itself failed ({type(exc).__name__}: {exc})"))
    seen, unique = set(), []
    for f in result.findings:
        if (f.kind, f.what, f.line) not in seen:
            seen.add((f.kind, f.what, f.line))
            unique.append(f)
    result.findings = unique
    return result


def _default_transform(code: str) -> str:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(code)


def _matches(name: str, patterns) -> str | None:
    for p in patterns:
        if p.endswith("*"):
            if name.startswith(p[:-1]):
                return p
        elif name == p or name.startswith(p + "."):
            return p
    return None


def _short(node: ast.AST, limit: int = 60) -> str:
    try:
        text = ast.unparse(node)
    except Exception:  # unparse of an odd tree: the node's kind is enough to point at it
        text = type(node).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _const_str(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _arg(call: ast.Call, position: int | None, keywords) -> ast.AST | None:
    keywords = (keywords,) if isinstance(keywords, str) else tuple(keywords or ())
    for kw in call.keywords:
        if kw.arg in keywords:
            return kw.value
    if position is not None and len(call.args) > position and not any(isinstance(a, ast.Starred) for a in call.args[: position + 1]):
        return call.args[position]
    if position is not None and any(isinstance(a, ast.Starred) for a in call.args):
        return ast.Starred(value=ast.Name("?", ast.Load()), ctx=ast.Load())  # *args: the target is unknown
    return None


def _strings_in(node: ast.AST) -> str:
    """The constant text of an expression (a command line, a list of arguments), for pattern checks."""
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


class _Analyser:
    def __init__(self, result: Analysis, namespace, transform, cwd: str) -> None:
        self.result, self.ns, self.transform, self.cwd = result, namespace, transform, cwd

    def add(self, kind: str, what: str, line: int) -> None:
        self.result.findings.append(Finding(kind, what, line))

    # -- entry points -------------------------------------------------------------------------

    def cell(self, code: str, depth: int, line: int) -> None:
        """Cell text (magics allowed): IPython's transformation, then the Python analysis."""
        try:
            python = (self.transform or _default_transform)(code)
        except Exception as exc:  # IPython refuses the cell: the kernel would not run it as written either
            self.add(UNCHECKABLE, f"IPython cannot transform the code ({type(exc).__name__}: {exc})", line)
            return
        self.python(python, depth, line)

    def python(self, code: str, depth: int, line: int) -> None:
        if depth > MAX_DEPTH:
            self.add(UNCHECKABLE, "code nested in code too deeply to follow", line)
            return
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            where = f" at line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
            self.add(UNCHECKABLE, f"the code does not parse{where} ({type(exc).__name__}: {getattr(exc, 'msg', exc)})", line)
            return
        try:
            _Module(self, tree, depth, line).run()
        except RecursionError:
            self.add(UNCHECKABLE, "expressions nested too deeply to analyse", line)


class _Module:
    """One parsed piece of code: its bindings, then every node checked against them."""

    def __init__(self, analyser: _Analyser, tree: ast.Module, depth: int, base_line: int) -> None:
        self.a, self.tree, self.depth, self.base = analyser, tree, depth, base_line
        self.binds: dict[str, set] = {}
        self.bound: set[str] = set()  # every name the code binds (to a value known or not)
        self.first_store: dict[str, int] = {}  # module-level name -> first line that binds it
        self.star_modules: list[str] = []
        self.globals_declared: set[str] = set()
        self.changes_cwd = False
        self.parents: dict[int, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                self.parents[id(child)] = parent

    def line(self, node) -> int:
        """The line in the user's cell (code nested in a string points at the line holding it)."""
        return self.base or getattr(node, "lineno", 0)

    def add(self, kind: str, what: str, node) -> None:
        self.a.add(kind, what, self.line(node))

    # -- values -------------------------------------------------------------------------------
    # A value is a tuple: ("q", "os.remove") a module, function or class by qualified name;
    # ("shell",) IPython's shell; ("ns",) a namespace dict; ("path", "a.csv" | None) a pathlib
    # path; ("str", "a.csv") a constant string; ("buf",) an in-memory buffer or stream.

    def run(self) -> None:
        self._collect_bindings()
        for node in ast.walk(self.tree):
            self._check(node)

    def _namespace_values(self, name: str) -> set:
        ns = self.a.ns
        if ns is None or name not in ns:
            return set()
        try:
            return _object_values(ns[name], ns)
        except Exception:  # an object that misbehaves under isinstance: nothing known about it
            return set()

    def name_values(self, name: str) -> set:
        out = set(self.binds.get(name, ()))
        from_ns = self._namespace_values(name)
        out |= from_ns
        if name not in self.bound and not from_ns:
            if name == "get_ipython":
                out.add(("q", "IPython.get_ipython"))
            elif name == "__builtins__":
                out.add(("q", "builtins"))
            elif name in ("exit", "quit"):  # ipykernel takes them out of builtins and puts its own in the namespace
                out.add(("q", f"builtins.{name}"))
            elif hasattr(builtins, name):
                out.add(("q", f"builtins.{name}"))
            elif name in CONVENTIONS:
                out.add(("q", CONVENTIONS[name]))
            elif name in KNOWN_MODULES:
                out.add(("q", name))
            for module in self.star_modules:
                out.add(("q", f"{module}.{name}"))
        return out

    def values(self, node, depth: int = 0) -> set:
        if depth > 30:
            return set()
        d = depth + 1
        if isinstance(node, ast.Name):
            return self.name_values(node.id)
        if isinstance(node, ast.Constant):
            return {("str", node.value)} if isinstance(node.value, str) else set()
        if isinstance(node, ast.Attribute):
            out = set()
            for v in self.values(node.value, d):
                if v[0] == "q":
                    out.add(("q", _normal(f"{v[1]}.{node.attr}")))
                elif v[0] == "shell":
                    out.add(("ns",) if node.attr in ("user_ns", "user_global_ns", "user_ns_hidden")
                            else ("q", f"IPython.shell.{node.attr}"))
                elif v[0] == "path":
                    out.add(("path", None) if node.attr in ("parent", "parents") else ("q", f"pathlib.Path.{node.attr}"))
            return out
        if isinstance(node, ast.Call):
            return self._call_values(node, d)
        if isinstance(node, ast.Subscript):
            out = set()
            key = _const_str(node.slice)
            for v in self.values(node.value, d):
                if v == ("q", "sys.modules") and key:
                    out.add(("q", _normal(key)))
                elif v[0] == "q" and v[1].endswith(".__dict__") and key:
                    out.add(("q", _normal(f"{v[1][: -len('.__dict__')]}.{key}")))
                elif v == ("ns",) and key:
                    out |= self.name_values(key)
                elif v[0] == "path":
                    out.add(("path", None))  # path.parents[0]
            return out
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            out = set()
            right = _const_str(node.right)
            for v in self.values(node.left, d):
                if v[0] == "path":
                    out.add(("path", os.path.join(v[1], right) if v[1] is not None and right is not None else None))
            return out
        if isinstance(node, ast.IfExp):
            return self.values(node.body, d) | self.values(node.orelse, d)
        if isinstance(node, ast.BoolOp):
            return set().union(*(self.values(v, d) for v in node.values))
        if isinstance(node, ast.NamedExpr):
            return self.values(node.value, d)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):  # iterated over in a for loop
            return set().union(*(self.values(e, d) for e in node.elts)) if node.elts else set()
        return set()

    def _call_values(self, call: ast.Call, d: int) -> set:
        out = set()
        for v in self.values(call.func, d):
            if v[0] != "q":
                continue
            q = v[1]
            if q.endswith("get_ipython"):
                out.add(("shell",))
            elif q in ("builtins.__import__", "importlib.import_module", "importlib.__import__"):
                name = _const_str(call.args[0]) if call.args else None
                if name:
                    out |= {("q", _normal(name)), ("q", _normal(name.split(".")[0]))}
            elif q == "builtins.getattr" and len(call.args) >= 2:
                attr = _const_str(call.args[1])
                if attr:
                    out |= self.values(ast.Attribute(value=call.args[0], attr=attr, ctx=ast.Load()), d)
            elif q in ("builtins.globals", "builtins.locals") or (q == "builtins.vars" and not call.args):
                out.add(("ns",))
            elif q == "builtins.vars":
                out |= {("q", f"{w[1]}.__dict__") for w in self.values(call.args[0], d) if w[0] == "q"}
            elif q in PATH_FACTORIES:
                parts = [_const_str(a) for a in call.args]
                known = all(p is not None for p in parts)
                out.add(("path", os.path.join(*parts) if known and parts else ("." if known else None)))
            elif q.startswith("pathlib.Path.") and q.rsplit(".", 1)[1] in PATH_RETURNING:
                out.add(("path", None))
            elif q == "os.path.join" or q in ("builtins.str", "os.fspath", "os.path.abspath", "os.path.expanduser"):
                parts = [self._path_text(a) for a in call.args]
                if parts and all(p is not None for p in parts):
                    out.add(("str", os.path.join(*parts)))
            elif _matches(q, BUFFERS):
                out.add(("buf",))
        return out

    def _path_text(self, node) -> str | None:
        texts = {v[1] for v in self.values(node) if v[0] in ("str", "path")}
        return texts.pop() if len(texts) == 1 and None not in texts else None

    # -- bindings -----------------------------------------------------------------------------

    def _bind(self, target, values: set, node) -> None:
        if isinstance(target, ast.Name):
            self.bound.add(target.id)
            if values:
                self.binds.setdefault(target.id, set()).update(values)
            if self.parents.get(id(node)) is self.tree or node in self.tree.body:
                self.first_store.setdefault(target.id, getattr(node, "lineno", 0))
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._bind(t.value if isinstance(t, ast.Starred) else t, set(), node)

    def _iteration_values(self, node) -> set:
        """What a loop over ``node`` binds: paths from ``Path.glob()`` and lists of paths."""
        out = set()
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return self.values(node)
        if isinstance(node, ast.Call):
            for v in self.values(node.func):
                if v[0] == "q" and v[1].startswith("pathlib.Path.") and v[1].rsplit(".", 1)[1] in ("glob", "rglob", "iterdir"):
                    out.add(("path", None))
        for v in self.values(node):
            if v[0] == "path":
                out.add(("path", None))
        return out

    def _collect_bindings(self) -> None:
        for _ in range(3):  # aliases of aliases (a = os; b = a) settle within a few passes
            for node in ast.walk(self.tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.asname:
                            self._bind(ast.Name(alias.asname), {("q", _normal(alias.name))}, node)
                        else:
                            top = alias.name.split(".")[0]
                            self._bind(ast.Name(top), {("q", _normal(top))}, node)
                elif isinstance(node, ast.ImportFrom):
                    if node.level or not node.module:
                        for alias in node.names:
                            self._bind(ast.Name(alias.asname or alias.name), set(), node)
                        continue
                    for alias in node.names:
                        if alias.name == "*":
                            if _normal(node.module) not in self.star_modules:
                                self.star_modules.append(_normal(node.module))
                        else:
                            self._bind(ast.Name(alias.asname or alias.name), {("q", _normal(f"{node.module}.{alias.name}"))}, node)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List)) \
                                and len(target.elts) == len(node.value.elts):
                            for t, v in zip(target.elts, node.value.elts):
                                self._bind(t, self.values(v), node)
                        else:
                            self._bind(target, self.values(node.value), node)
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                    self._bind(node.target, self.values(node.value) if isinstance(node, ast.AnnAssign) else set(), node)
                elif isinstance(node, ast.NamedExpr):
                    self._bind(node.target, self.values(node.value), node)
                elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                    self._bind(node.target, self._iteration_values(node.iter), node)
                elif isinstance(node, (ast.With, ast.AsyncWith)):
                    for item in node.items:
                        if item.optional_vars is not None:
                            vals = {v for v in self.values(item.context_expr) if v[0] in ("path", "buf")}
                            self._bind(item.optional_vars, vals, node)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self._bind(ast.Name(node.name), set(), node)
                elif isinstance(node, ast.Global):
                    self.globals_declared.update(node.names)

    # -- checks -------------------------------------------------------------------------------

    def _check(self, node) -> None:
        if isinstance(node, ast.Call):
            self._check_call(node)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
            self._check_reference(node)
        elif isinstance(node, ast.Delete):
            self._check_delete(node)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                self._check_store(t, node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            self._check_string(node)
        elif isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            self.add(UNCHECKABLE, f"{_short(node)} reaches into the interpreter's internals", node)
        elif isinstance(node, ast.Name) and node.id == "__builtins__":
            self.add(UNCHECKABLE, "__builtins__ reaches into the interpreter's internals", node)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _const_str(node.slice) is None:
            if any(v == ("q", "sys.modules") or (v[0] == "q" and v[1].endswith(".__dict__")) for v in self.values(node.value)):
                self.add(UNCHECKABLE, f"{_short(node)} looks a module or function up by a name computed at run time", node)

    def _check_reference(self, node) -> None:
        """A function used as a value (``map(os.remove, files)``, ``f = shutil.rmtree``)."""
        parent = self.parents.get(id(node))
        if isinstance(parent, ast.Attribute) and parent.value is node:
            return  # part of a longer name: the whole name is checked
        if isinstance(parent, ast.Call) and parent.func is node:
            return  # a call: checked with its arguments
        for v in self.values(node):
            if v[0] == "q":
                self._check_qualified(v[1], node, reference=True)

    def _check_qualified(self, q: str, node, reference: bool = False, call: ast.Call | None = None) -> None:
        what = _short(call if call is not None else node)
        if call is not None and q in ("IPython.shell.system", "IPython.shell.getoutput") and call.args:
            command = _const_str(call.args[0])
            what = f"!{command}"[:60] if command is not None else what  # as the user wrote it
        for kind, patterns in ALWAYS.items():
            if _matches(q, patterns):
                self.add(kind, what, node)
        if reference and (q in WRITERS or q in OPENERS and q != "builtins.open" or q in ("builtins.exec", "builtins.eval")):
            self.add(FILES if q in WRITERS or q in OPENERS else UNCHECKABLE,
                     f"{_short(node)} passed on as a value, so its arguments cannot be checked", node)

    def _check_call(self, call: ast.Call) -> None:
        func_values = self.values(call.func)
        qualified = sorted(v[1] for v in func_values if v[0] == "q")
        for q in qualified:
            self._check_qualified(q, call.func, call=call)
            self._check_known_call(q, call)
        if any(kw.arg == "download" and not (isinstance(kw.value, ast.Constant) and not kw.value.value) for kw in call.keywords):
            self.add(NETWORK, _short(call), call)
        if isinstance(call.func, ast.Attribute) and not any(v[0] == "q" and not v[1].startswith("pathlib.Path.") for v in func_values):
            self._check_method(call, call.func)

    def _check_known_call(self, q: str, call: ast.Call) -> None:
        if q in ("builtins.exec", "builtins.eval", "builtins.compile", "IPython.shell.run_cell"):
            sources = self.values(call.args[0]) if call.args else set()
            if not sources or any(v[0] != "str" for v in sources):
                self.add(UNCHECKABLE, f"{_short(call)} runs code this check cannot see", call)
            for _, source in (v for v in sources if v[0] == "str"):
                if q == "IPython.shell.run_cell":
                    self.a.cell(source, self.depth + 1, self.line(call))
                else:
                    self.a.python(source, self.depth + 1, self.line(call))
        elif q in ("builtins.getattr", "builtins.setattr", "builtins.delattr", "operator.attrgetter",
                   "operator.methodcaller"):
            pos = 0 if q.startswith("operator.") else 1
            attr = _const_str(call.args[pos]) if len(call.args) > pos else None
            if attr is None:
                self.add(UNCHECKABLE, f"{_short(call)} uses an attribute name computed at run time", call)
            elif q.startswith("operator.") and attr in RISKY_METHOD_NAMES:
                self.add(UNCHECKABLE, f"{_short(call)} calls .{attr}() on objects chosen at run time", call)
            elif q == "builtins.getattr":
                parent = self.parents.get(id(call))
                if not (isinstance(parent, ast.Call) and parent.func is call):  # a call of it is checked there
                    for v in self.values(call):
                        if v[0] == "q":
                            self._check_qualified(v[1], call, reference=True)
            if q in ("builtins.setattr", "builtins.delattr") and call.args:
                if any(v[0] in ("q", "shell", "ns") for v in self.values(call.args[0])):
                    self.add(NAMESPACE, f"{_short(call)} replaces part of a module or of the notebook", call)
        elif q in ("builtins.__import__", "importlib.import_module", "importlib.__import__"):
            if not call.args or _const_str(call.args[0]) is None:
                self.add(UNCHECKABLE, f"{_short(call)} imports a module named at run time", call)
        elif q in WRITERS:
            pos, kw = WRITERS[q]
            self._check_target(_arg(call, pos, kw), call, q)
        elif q in ("pathlib.Path.write_text", "pathlib.Path.write_bytes", "pathlib.Path.open") and not (
                isinstance(call.func, ast.Attribute) and any(v[0] == "path" for v in self.values(call.func.value))):
            # called unbound (Path.write_text(p, ...), or through an alias): the path is the first argument
            if q.endswith("open"):
                self._check_open(call, None, 1, "r", receiver=call.args[0] if call.args else ast.Name("?"))
            else:
                self._check_target(_arg(call, 0, "self"), call, q)
        elif q in OPENERS:
            path_pos, mode_pos, default = OPENERS[q]
            self._check_open(call, path_pos, mode_pos, default, receiver=None)
        elif q == "os.open":
            self._check_os_open(call)
        elif q in ("fileinput.input", "fileinput.FileInput"):
            inplace = next((kw.value for kw in call.keywords if kw.arg == "inplace"), None)
            if inplace is not None and not (isinstance(inplace, ast.Constant) and not inplace.value):
                self.add(FILES, f"{_short(call)} rewrites files in place", call)
        elif q in ("IPython.shell.run_line_magic", "IPython.shell.run_cell_magic", "IPython.shell.magic"):
            self._check_magic(q, call)
        if _matches(q, ALWAYS[SHELL]):
            self._check_command(self._command_text(call), call)

    def _command_text(self, call: ast.Call) -> str:
        """The constant text of a command's arguments, names bound to strings included."""
        args = list(call.args) + [k.value for k in call.keywords]
        texts = [_strings_in(a) for a in args]
        texts += [v[1] for a in args for v in self.values(a) if v[0] == "str" and not isinstance(a, ast.Constant)]
        return " ".join(texts)

    def _check_command(self, text: str, node) -> None:
        """A shell command's text: installs, file changes (the shell itself is already a finding)."""
        if INSTALL_COMMAND.search(text) or re.search(r"-m\s+(?:pip|ensurepip|conda)\b", text):
            self.add(INSTALL, f"the command {' '.join(text.split())[:60]!r}", node)
        if FILE_COMMAND.search(text):
            self.add(FILES, f"the command {' '.join(text.split())[:60]!r}", node)

    def _check_method(self, call: ast.Call, func: ast.Attribute) -> None:
        """Methods whose name says what they do, on an object whose type is not known here."""
        attr = func.attr
        receiver = self.values(func.value)
        is_path = any(v[0] == "path" for v in receiver)
        text_accessor = isinstance(func.value, ast.Attribute) and func.value.attr == "str"  # pandas' .str.extractall
        for kind, names in ALWAYS_METHODS.items():
            if attr in names and not text_accessor:
                self.add(kind, _short(call), call)
        if attr in PATH_METHODS and is_path:
            self.add(FILES, _short(call), call)
        if attr in NAMESPACE_METHODS and ("ns",) in receiver:
            self.add(NAMESPACE, f"{_short(call)} changes the notebook's namespace", call)
        if attr in ("write_text", "write_bytes"):
            self._check_target(func.value, call, _short(func))
        elif attr == "open" and (is_path or call.args or call.keywords):
            if is_path:
                self._check_open(call, None, 0, "r", receiver=func.value)
            elif call.args and _is_mode(_const_str(call.args[0])):  # fs.open("w"): a path object's open
                self._check_open(call, None, 0, "r", receiver=func.value)
            else:  # fs.open(path, mode)
                self._check_open(call, 0, 1, "r", receiver=None)
        elif attr == "to_sql":
            mode = next((kw.value for kw in call.keywords if kw.arg == "if_exists"), None)
            value = _const_str(mode) if mode is not None else "fail"
            if value != "fail":
                self.add(FILES, f"{_short(call)} {'replaces' if value == 'replace' else 'changes'} a database table", call)
        elif attr in WRITER_METHODS:
            pos, kws = WRITER_METHODS[attr]
            target = _arg(call, pos, kws)
            if target is not None:
                self._check_target(target, call, _short(call))

    def _check_open(self, call: ast.Call, path_pos, mode_pos, default: str, receiver) -> None:
        mode_node = _arg(call, mode_pos, "mode")
        mode = default if mode_node is None else _const_str(mode_node)
        if mode is None:
            self.add(FILES, f"{_short(call)} opens a file with a mode computed at run time", call)
            return
        if not any(c in mode for c in "wax+"):
            return
        target = receiver if receiver is not None else _arg(call, path_pos, ("file", "filename", "name", "path", "fileobj"))
        self._check_target(target, call, _short(call))

    def _check_os_open(self, call: ast.Call) -> None:
        flags = _arg(call, 1, "flags")
        names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(flags)
                 if isinstance(n, (ast.Attribute, ast.Name))} if flags is not None else set()
        if names and names <= {"O_RDONLY", "os", "O_CLOEXEC", "O_NONBLOCK", "O_BINARY", "O_NOFOLLOW"}:
            return  # read only
        self._check_target(_arg(call, 0, "path"), call, _short(call))

    def _check_target(self, target, call, what: str) -> None:
        """A write to ``target``: a finding when it exists or cannot be worked out."""
        if target is None:
            self.add(FILES, f"{what} writes to a file this check cannot work out", call)
            return
        values = self.values(target)
        if any(v[0] == "buf" for v in values) and not any(v[0] in ("str", "path") for v in values):
            return  # an in-memory buffer or an open stream
        texts = {v[1] for v in values if v[0] in ("str", "path")}
        if not texts or None in texts:
            self.add(FILES, f"{what} writes to a path this check cannot work out", call)
            return
        for text in texts:
            path = os.path.expanduser(text)
            if not os.path.isabs(path) and self._changes_cwd():
                self.add(FILES, f"{what} writes to {text!r} after changing the working directory", call)
            elif os.path.lexists(os.path.join(self.a.cwd, path)):
                self.add(FILES, f"{what} overwrites {text!r}, which exists", call)

    def _changes_cwd(self) -> bool:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                qs = {v[1] for v in self.values(node.func) if v[0] == "q"}
                if qs & {"os.chdir", "os.fchdir"}:
                    return True
                if "IPython.shell.run_line_magic" in qs and node.args and _const_str(node.args[0]) in CWD_MAGICS:
                    return True
        return False

    def _check_magic(self, q: str, call: ast.Call) -> None:
        if q == "IPython.shell.magic":  # the old spelling: magic("name args")
            text = _const_str(call.args[0]) if call.args else None
            name, _, line = (text or "").lstrip("%").partition(" ")
            name, body = (name if text is not None else None), None
            cell = False
        else:
            cell = q.endswith("run_cell_magic")
            name = _const_str(call.args[0]) if call.args else None
            line = _const_str(call.args[1]) if len(call.args) > 1 else ("" if len(call.args) == 1 else None)
            body = _const_str(call.args[2]) if cell and len(call.args) > 2 else None
        if name is None:
            self.add(UNCHECKABLE, f"{_short(call)} runs a magic named at run time", call)
            return
        shown = f"%%{name} {line or ''}".strip() if cell else f"%{name} {line or ''}".strip()
        if line is None or (cell and body is None):
            if name not in SAFE_MAGICS:
                self.add(UNCHECKABLE, f"{_short(call)}: a magic with arguments computed at run time", call)
            return
        if name in PYTHON_MAGICS:
            code = body if cell else _strip_options(line)
            if code.strip():
                self.a.cell(code, self.depth + 1, self.line(call))
        elif name in SHELL_MAGICS:
            self.add(SHELL, shown[:80], call)
            self._check_command(f"{line}\n{body or ''}", call)
            if name in FILE_SHELL_MAGICS:
                self.add(FILES, shown[:80], call)
        elif name in INSTALL_MAGICS:
            words = [w for w in line.split() if not w.startswith("-")] or [""]
            if words[0] not in INSTALL_READ_ONLY:
                self.add(INSTALL, shown[:80], call)
        elif name in NAMESPACE_MAGICS:
            self.add(NAMESPACE, shown[:80], call)
        elif name in FILE_MAGICS:
            if name in ("writefile", "file"):
                target = [w for w in line.split() if not w.startswith("-")]
                node = ast.Constant(target[-1]) if target else None
                self._check_target(node, call, shown[:80])
            else:
                self.add(FILES, shown[:80], call)
        elif name in BROWSER_MAGICS:
            self.add(UNCHECKABLE, f"{shown[:60]} runs code in the browser", call)
        elif name == "history" and re.search(r"(^|\s)-f\b", line):
            self.add(FILES, shown[:80], call)
        elif name in SAFE_MAGICS:
            if URL.search(line):
                self.add(NETWORK, shown[:80], call)
        elif name == "run":
            self.add(UNCHECKABLE, f"{shown[:60]} runs another file", call)
        else:
            self.add(UNCHECKABLE, f"{shown[:60]} (a magic this check does not know)", call)

    def _check_delete(self, node: ast.Delete) -> None:
        at_module_level = _module_level_block(node, self)
        for target in node.targets:
            for t in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                if not isinstance(t, ast.Name):
                    continue
                if not at_module_level and t.id not in self.globals_declared:
                    continue
                if self._user_variable(t.id, node):
                    self.add(NAMESPACE, f"del {t.id}", node)

    def _user_variable(self, name: str, node) -> bool:
        ns = self.a.ns
        if ns is not None:
            return name in ns and not name.startswith("_") and name not in ("In", "Out")
        first = self.first_store.get(name)
        return first is None or first >= getattr(node, "lineno", 0)

    def _check_store(self, target, node) -> None:
        """Stores and deletes into namespaces, modules and the shell."""
        for t in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
            if isinstance(t, ast.Subscript):
                if ("ns",) in self.values(t.value):
                    self.add(NAMESPACE, f"{_short(t)} {'deleted' if isinstance(node, ast.Delete) else 'replaced'} "
                             "in the notebook's namespace", node)
            elif isinstance(t, ast.Attribute):
                owners = self.values(t.value)
                if any(v[0] == "shell" for v in owners) or any(v[0] == "q" and _is_module_like(v[1]) for v in owners):
                    self.add(NAMESPACE, f"{_short(t)} replaced", node)

    def _check_string(self, node: ast.Constant) -> None:
        parent = self.parents.get(id(node))
        if isinstance(parent, ast.Expr):
            return  # a docstring or a bare string: never used
        if URL.search(node.value):
            self.add(NETWORK, f"the URL {node.value[:60]!r}", node)


def _module_level_block(node, module: _Module) -> bool:
    """A ``del`` inside if/for/with/try at module level still deletes a module-level name."""
    parent = module.parents.get(id(node))
    while parent is not None and not isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        if parent is module.tree:
            return True
        parent = module.parents.get(id(parent))
    return False


def _is_mode(text: str | None) -> bool:
    return text is not None and 0 < len(text) <= 4 and set(text) <= set("rwaxbtU+")


def _is_module_like(q: str) -> bool:
    """Qualified names whose attributes are shared state: modules such as builtins, os, sys."""
    return q in ("builtins", "os", "sys", "os.path", "shutil", "subprocess", "io", "pathlib", "pandas", "numpy")


def _strip_options(line: str) -> str:
    """A line magic's statement without its leading options (``%timeit -n1 -r3 stmt``)."""
    words = line.split(" ")
    while words and words[0].startswith("-"):
        words.pop(0)
    return " ".join(words)


def _normal(q: str) -> str:
    head = q
    for old, new in MODULE_ALIASES.items():
        if q == old or q.startswith(old + "."):
            head = new + q[len(old):]
            break
    return head


def _object_values(obj, ns: dict) -> set:
    """What a live object from the user's namespace is, in the analysis's terms."""
    from pathlib import PurePath

    if isinstance(obj, types.ModuleType):
        return {("q", _normal(obj.__name__))}
    if isinstance(obj, PurePath):
        return {("path", str(obj))}
    if isinstance(obj, str):
        return {("str", obj)}
    if obj is ns:
        return {("ns",)}
    if type(obj).__name__.endswith("ExitAutocall"):  # IPython's exit and quit
        return {("q", "builtins.exit")}
    if type(obj).__name__.endswith("InteractiveShell"):
        return {("shell",)}
    if isinstance(obj, types.MethodType):
        owner = obj.__self__
        if type(owner).__name__.endswith("InteractiveShell"):
            return {("q", f"IPython.shell.{obj.__name__}")} if obj.__name__ != "get_ipython" else {("q", "IPython.get_ipython")}
        if isinstance(owner, PurePath):
            return {("q", f"pathlib.Path.{obj.__name__}")}
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        module = getattr(obj, "__module__", None) or "builtins"
        return {("q", _normal(f"{module}.{obj.__qualname__}"))}
    import io

    if isinstance(obj, io.IOBase):
        return {("buf",)}
    return set()
