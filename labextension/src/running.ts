/**
 * Which cells a kernel is running, as the inline completer needs to know: it never sends a request
 * that would wait behind a running cell.
 */
import type { Kernel, KernelMessage } from '@jupyterlab/services';
import type { NotebookPanel } from '@jupyterlab/notebook';

/**
 * The cells running in a kernel, from any client, by their execute requests' ids. The kernel's
 * status alone is not enough: ipykernel announces busy and idle for each control-channel message
 * too (a debugger's request, the server's kernel_info nudge), so it reads idle while a cell still
 * runs, and a completion request sent then would wait behind the cell.
 */
const running = new WeakMap<Kernel.IKernelConnection, Set<string>>();

export function runningCells(kernel: Kernel.IKernelConnection): Set<string> {
  let cells = running.get(kernel);
  if (!cells) {
    const ids = new Set<string>();
    running.set(kernel, ids);
    kernel.iopubMessage.connect((_, msg) => {
      const parent = msg.parent_header as Partial<KernelMessage.IHeader>;
      if (msg.header.msg_type !== 'status' || parent.msg_type !== 'execute_request' || !parent.msg_id) {
        return;
      }
      const state = (msg as KernelMessage.IStatusMsg).content.execution_state;
      if (state === 'busy') {
        ids.add(parent.msg_id);
      } else if (state === 'idle') {
        ids.delete(parent.msg_id);
      }
    });
    kernel.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting' || status === 'starting' || status === 'dead') {
        ids.clear(); // a new kernel process runs nothing yet
      }
    });
    cells = ids;
  }
  return cells;
}

/** Follow a notebook's kernels from the start, so cells started before the first completion count. */
export function watchRunningCells(panel: NotebookPanel): void {
  const watch = () => {
    const kernel = panel.sessionContext.session?.kernel;
    if (kernel) {
      runningCells(kernel);
    }
  };
  panel.sessionContext.kernelChanged.connect(watch);
  watch();
}
