/**
 * gemma4-nb's JupyterLab 4 / Notebook 7 extension: the chat sidebar, and the comm target through
 * which the kernel inserts cells (the agent, the ipywidgets panel's "insert" buttons).
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Kernel } from '@jupyterlab/services';
import { LabIcon } from '@jupyterlab/ui-components';

import { FRONTEND_TARGET, KernelMessage } from './protocol';
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

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'gemma4-nb:sidebar',
  description: 'A chat with the Gemma copilot in the active notebook kernel.',
  autoStart: true,
  requires: [INotebookTracker, IRenderMimeRegistry],
  optional: [ILabShell],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker, rendermime: IRenderMimeRegistry) => {
    const sidebar = new ChatSidebar(tracker, rendermime);
    sidebar.title.icon = ICON;
    app.shell.add(sidebar, 'right', { rank: 600 });
    tracker.widgetAdded.connect((_, panel) => acceptKernelInserts(panel));
    app.commands.addCommand('gemma4-nb:open-chat', {
      label: 'Open the gemma4-nb chat',
      execute: () => app.shell.activateById(sidebar.id)
    });
  }
};

export default plugin;
