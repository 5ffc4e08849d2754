/**
 * Inline (ghost-text) completion through JupyterLab's inline completer: the code after the cursor
 * comes from the kernel's completion model, over the sidebar's comm, and only while the kernel is
 * idle (a request never waits behind a running cell). Turned off in Settings → Inline Completer
 * (providers → gemma4-nb → enabled), or in the kernel with `%gemma config completion_model=off`.
 */
import {
  CompletionHandler,
  IInlineCompletionContext,
  IInlineCompletionList,
  IInlineCompletionProvider
} from '@jupyterlab/completer';
import { NotebookPanel } from '@jupyterlab/notebook';

import { runningCells } from './running';

/** What the provider needs from the sidebar: ask its kernel for a completion. */
export interface ICompletionSource {
  complete(panel: NotebookPanel, prefix: string, suffix: string, cells: string[]): Promise<string>;
}

export class GemmaInlineProvider implements IInlineCompletionProvider {
  readonly identifier = 'gemma4-nb';
  readonly name = 'gemma4-nb (in-kernel model)';
  // wait for a pause in typing; the kernel's model answers in a few hundred milliseconds
  readonly schema = { default: { debouncerDelay: 250, timeout: 8000 } };

  constructor(private readonly source: ICompletionSource) {}

  async fetch(request: CompletionHandler.IRequest, context: IInlineCompletionContext): Promise<IInlineCompletionList> {
    const panel = context.widget;
    if (!(panel instanceof NotebookPanel)) {
      return { items: [] };
    }
    const kernel = panel.sessionContext.session?.kernel;
    const active = panel.content.activeCell;
    if (!kernel || kernel.status !== 'idle' || runningCells(kernel).size > 0 || !active || active.model.type !== 'code') {
      return { items: [] }; // busy: never queue behind a running cell
    }
    const index = panel.content.widgets.indexOf(active);
    const cells = panel.content.widgets
      .slice(0, Math.max(index, 0))
      .filter(c => c.model.type === 'code')
      .map(c => c.model.sharedModel.getSource());
    const prefix = request.text.slice(0, request.offset);
    const suffix = request.text.slice(request.offset);
    const text = await this.source.complete(panel, prefix, suffix, cells);
    return { items: text ? [{ insertText: text }] : [] };
  }
}
