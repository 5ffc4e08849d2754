/**
 * gemma4-nb's JupyterLab 4 / Notebook 7 extension: the chat sidebar, and the comm target through
 * which the kernel inserts cells (the agent, the ipywidgets panel's "insert" buttons).
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { ICodeCellModel } from '@jupyterlab/cells';
import { ICompletionProviderManager } from '@jupyterlab/completer';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Kernel } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';

import { FRONTEND_TARGET, KernelMessage } from './protocol';
import { GemmaInlineProvider } from './completion';
import { watchRunningCells } from './running';
import { ChatSidebar, insertCell } from './sidebar';

const ICON = new LabIcon({
  name: 'gemma4-nb:chat',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><path class="jp-icon3" fill="#616161" ' +
    'd="M12 2l2.2 6.8L21 11l-6.8 2.2L12 20l-2.2-6.8L3 11l6.8-2.2z"/></svg>'
});

/** Accept the kernel's own comm on every notebook kernel: cells it asks to insert go below. */
function acceptKernelInserts(panel: NotebookPanel): void {
  const register = (kernel: Kernel.IKernelConnection | null | undefined) => {
    kernel?.registerCommTarget(FRONTEND_TARGET, comm => {
      comm.onMsg = msg => {
        const data = msg.content.data as unknown as KernelMessage;
        if (data.type === 'insert_cell') {
          void insertCell(panel, data.code, data.run);
        }
      };
    });
  };
  panel.sessionContext.kernelChanged.connect((_, change) => register(change.newValue));
  void panel.sessionContext.ready.then(() => register(panel.sessionContext.session?.kernel));
}

/** The active cell's error output as one line per part (ename: evalue, then the traceback), or "". */
function cellError(panel: NotebookPanel): string {
  const model = panel.content.activeCell?.model;
  if (!model || model.type !== 'code') {
    return '';
  }
  const outputs = (model as ICodeCellModel).outputs;
  for (let i = 0; i < outputs.length; i++) {
    const o = outputs.get(i).toJSON() as { output_type: string; ename?: string; evalue?: string; traceback?: string[] };
    if (o.output_type === 'error') {
      // eslint-disable-next-line no-control-regex
      const tb = (o.traceback || []).join('\n').replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
      return `${o.ename}: ${o.evalue}${tb ? `\n${tb.split('\n').slice(-12).join('\n')}` : ''}`;
    }
  }
  return '';
}

/** The ipywidgets panel's box sends on Enter (Shift+Enter: a new line), as the sidebar's does:
 *  ipywidgets' Textarea has no key events of its own, so the extension clicks the panel's Send. */
function sendWidgetPanelOnEnter(): void {
  document.addEventListener(
    'keydown',
    (e: KeyboardEvent) => {
      const target = e.target as HTMLElement | null;
      if (e.key !== 'Enter' || e.shiftKey || e.isComposing || target?.tagName !== 'TEXTAREA') {
        return;
      }
      const panel = target.closest('.gemma4-nb-panel');
      const send = panel
        ? Array.from(panel.querySelectorAll('button')).find(b => b.textContent?.trim() === 'Send')
        : undefined;
      if (send) {
        e.preventDefault();
        e.stopPropagation(); // not the notebook's own Enter
        target.dispatchEvent(new Event('input', { bubbles: true })); // the box's last keystrokes synced first
        send.click();
      }
    },
    true
  );
}

const COMMANDS = {
  open: 'gemma4-nb:open-chat',
  askSelection: 'gemma4-nb:ask-about-selection',
  explainError: 'gemma4-nb:explain-error',
  fixCell: 'gemma4-nb:fix-cell',
  docstring: 'gemma4-nb:add-docstring'
};

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gemma4-nb:sidebar',
  description: 'A chat with the Gemma copilot in the active notebook kernel.',
  autoStart: true,
  requires: [INotebookTracker, IRenderMimeRegistry],
  optional: [ILabShell, ICommandPalette, ICompletionProviderManager],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    rendermime: IRenderMimeRegistry,
    _labShell: ILabShell | null,
    palette: ICommandPalette | null,
    completions: ICompletionProviderManager | null
  ) => {
    const sidebar = new ChatSidebar(tracker, rendermime);
    sidebar.title.icon = ICON;
    app.shell.add(sidebar, 'right', { rank: 600 });
    tracker.widgetAdded.connect((_, panel) => {
      acceptKernelInserts(panel);
      watchRunningCells(panel);
    });
    sendWidgetPanelOnEnter();
    const open = () => app.shell.activateById(sidebar.id);
    const hasCell = () => !!tracker.currentWidget?.content.activeCell;
    const activeCell = () => {
      const panel = tracker.currentWidget;
      const cell = panel?.content.activeCell;
      return panel && cell ? { panel, cell, source: cell.model.sharedModel.getSource() } : null;
    };
    app.commands.addCommand(COMMANDS.open, {
      label: 'gemma4-nb: Open the chat',
      execute: open
    });
    app.commands.addCommand(COMMANDS.askSelection, {
      label: 'gemma4-nb: Ask about the selection',
      caption: 'The selected code (or the whole cell) goes into the chat for your question',
      isEnabled: hasCell,
      execute: () => {
        const at = activeCell();
        if (!at) {
          return;
        }
        const editor = at.cell.editor;
        let text = at.source;
        if (editor) {
          const sel = editor.getSelection();
          const a = editor.getOffsetAt(sel.start);
          const b = editor.getOffsetAt(sel.end);
          if (a !== b) {
            text = at.source.slice(Math.min(a, b), Math.max(a, b));
          }
        }
        open();
        sidebar.prefill(`\`\`\`python\n${text}\n\`\`\`\n`);
      }
    });
    app.commands.addCommand(COMMANDS.explainError, {
      label: 'gemma4-nb: Explain the error',
      caption: "Ask the chat about the active cell's error",
      isEnabled: () => !!tracker.currentWidget && !!cellError(tracker.currentWidget),
      execute: () => {
        const at = activeCell();
        const error = at ? cellError(at.panel) : '';
        if (!at || !error) {
          return;
        }
        open();
        sidebar.ask(`Explain this error and how to fix it.\n\n\`\`\`python\n${at.source}\n\`\`\`\n\n${error}`);
      }
    });
    app.commands.addCommand(COMMANDS.fixCell, {
      label: 'gemma4-nb: Fix the cell (proposed as a diff)',
      isEnabled: hasCell,
      execute: () => {
        const at = activeCell();
        if (at) {
          open();
          const error = cellError(at.panel);
          sidebar.requestEdit(at.panel, at.cell.model.id, at.source,
            error ? 'Fix this cell.' : 'Fix the bugs in this cell.', error || undefined);
        }
      }
    });
    app.commands.addCommand(COMMANDS.docstring, {
      label: 'gemma4-nb: Add docstrings to the cell (proposed as a diff)',
      isEnabled: hasCell,
      execute: () => {
        const at = activeCell();
        if (at) {
          open();
          sidebar.requestEdit(at.panel, at.cell.model.id, at.source, 'Add a docstring to each function and class in this cell; change nothing else.');
        }
      }
    });
    // ghost text from the kernel's completion model (JupyterLab's inline completer)
    completions?.registerInlineProvider(new GemmaInlineProvider(sidebar));
    app.commands.addKeyBinding({ command: COMMANDS.open, keys: ['Accel Shift J'], selector: 'body' });
    for (const command of Object.values(COMMANDS)) {
      palette?.addItem({ command, category: 'gemma4-nb' });
    }
    let rank = 100;
    for (const command of [COMMANDS.askSelection, COMMANDS.explainError, COMMANDS.fixCell, COMMANDS.docstring]) {
      app.contextMenu.addItem({ command, selector: '.jp-Notebook .jp-Cell', rank: rank++ });
    }
  }
};

export default plugin;
