"""``make demo``: execute ``examples/quickstart.ipynb`` headless with the default model, write the
executed notebook and an HTML export, and say where they are.

The notebook asks about a DataFrame, about a plot, and runs the agent, which writes and executes
a cell. It uses ``$GEMMA4_NB_MODEL`` when set, else the embedded Gemma 3 270M.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter


def run_notebook(path: Path, out_dir: Path, timeout: int = 900) -> tuple[Path, Path, float]:
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{path.stem}.executed.ipynb"
    nbformat.write(nb, executed)
    html, _ = HTMLExporter().from_notebook_node(nb)
    html_path = out_dir / f"{path.stem}.html"
    html_path.write_text(html, encoding="utf-8")
    return executed, html_path, seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    notebook = Path(argv[0]) if argv else Path("examples/quickstart.ipynb")
    out_dir = Path(argv[1]) if len(argv) > 1 else Path("build")
    print(f"executing {notebook} with a real kernel ...", flush=True)
    executed, html, seconds = run_notebook(notebook, out_dir)
    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.startswith("%%gemma"):
            print(f"\n>>> {cell.source}")
            for out in cell.outputs:
                text = out.get("text") or out.get("data", {}).get("text/markdown") or out.get("data", {}).get("text/plain", "")
                print(text.rstrip())
    print(f"\ndone in {seconds:.0f} s\nexecuted notebook: {executed.resolve()}\nHTML export:       {html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
